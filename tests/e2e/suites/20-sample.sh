# shellcheck shell=bash
# PCI register-level suites, checked from guest user space with no driver:
#   sample       vdevd's sample device over vfio-user (`vdevd sample --socket S`)
#   sample-qemu  QEMU's edu device: proves the guest side (enumeration,
#                config space, ID and liveness registers through
#                /sys/bus/pci/devices/*/resource0 with the pcimem helper)
E2E_SUITES+=(sample-qemu sample)

E2E_PCI_BDF=0000:00:04.0

suite_sample_qemu() {
    e2e_vm_start edu pci.sh pci "" pci 256 PCI_BDF="$E2E_PCI_BDF" PCI_VENDOR=0x1234 PCI_DEVICE=0x11e8 \
        PCI_ID_BAR=0 PCI_ID_OFF=0x0 PCI_ID_VALUE=0x010000ed PCI_LIVE_BAR=0 PCI_LIVE_OFF=0x4 \
        PCI_CHECKS="enumerate config id-register liveness" -- \
        -device '{"driver":"edu","bus":"pcie.0","addr":"0x4"}' || return
    e2e_vm_wait edu 300
    e2e_vm_expect edu enumerate config id-register liveness
}

# The sample device's identity and register layout, as its model defines
# them. Each is a setting so that the suite follows the model (and can be
# pointed at another vfio-user server):
#   VDEVD_E2E_SAMPLE_IDS   "VENDOR:DEVICE", e.g. 0x1b36:0x0000 (required)
#   VDEVD_E2E_SAMPLE_ID    "BAR OFFSET VALUE" of an ID register
#   VDEVD_E2E_SAMPLE_LIVE  "BAR OFFSET" of a liveness register (X in, ~X out)
#   VDEVD_E2E_SAMPLE_MMAP  "BAR LENGTH" of the BAR the server lets QEMU mmap:
#                          the guest fills and checks it, and QEMU's trace
#                          must show the mapping (vfio_region_mmap)
: "${VDEVD_E2E_SAMPLE_IDS:=}"
: "${VDEVD_E2E_SAMPLE_ID:=}"
: "${VDEVD_E2E_SAMPLE_LIVE:=}"
: "${VDEVD_E2E_SAMPLE_MMAP:=}"

suite_sample() {
    local sock=$E2E_RUN_DIR/sample.sock checks="enumerate config" id live mmap
    local -a cfg=(PCI_BDF="$E2E_PCI_BDF")
    if [ -z "$VDEVD_E2E_SAMPLE_IDS" ]; then
        e2e_fail "the sample device's IDs are not set (VDEVD_E2E_SAMPLE_IDS; defaults come with the device model)"
        return
    fi
    cfg+=(PCI_VENDOR="${VDEVD_E2E_SAMPLE_IDS%%:*}" PCI_DEVICE="${VDEVD_E2E_SAMPLE_IDS#*:}")
    read -r -a id <<<"$VDEVD_E2E_SAMPLE_ID"
    read -r -a live <<<"$VDEVD_E2E_SAMPLE_LIVE"
    read -r -a mmap <<<"$VDEVD_E2E_SAMPLE_MMAP"
    if [ "${#id[@]}" = 3 ]; then
        checks+=" id-register"
        cfg+=(PCI_ID_BAR="${id[0]}" PCI_ID_OFF="${id[1]}" PCI_ID_VALUE="${id[2]}")
    fi
    if [ "${#live[@]}" = 2 ]; then
        checks+=" liveness"
        cfg+=(PCI_LIVE_BAR="${live[0]}" PCI_LIVE_OFF="${live[1]}")
    fi
    if [ "${#mmap[@]}" = 2 ]; then
        checks+=" mem-bar"
        cfg+=(PCI_MEM_BAR="${mmap[0]}" PCI_MEM_LEN="${mmap[1]}")
    fi
    e2e_vdevd_start sample "$sock" sample --socket "$sock" || return
    # shellcheck disable=SC2086 # $checks is a list
    VDEVD_E2E_QEMU_TRACE=${VDEVD_E2E_QEMU_TRACE:-vfio_region_mmap} \
        e2e_vm_start sample pci.sh pci "" pci 256 "${cfg[@]}" PCI_CHECKS="$checks" -- \
        -device "$(e2e_vfio_user_device "$sock" 0x4)" || return
    e2e_vm_wait sample 300
    # shellcheck disable=SC2086
    e2e_vm_expect sample $checks
    if [ "${#mmap[@]}" = 2 ]; then
        if grep -q "vfio_region_mmap .* BAR ${mmap[0]} mmaps" "${E2E_LOG[sample]}/qemu.log"; then
            e2e_host_pass "QEMU mmapped BAR${mmap[0]} (vfio_region_mmap)"
        else
            e2e_fail "QEMU did not mmap BAR${mmap[0]}: no vfio_region_mmap for it in its trace"
        fi
    fi
    # The server outlives its client; it stops when told to.
    e2e_vdevd_stop sample
}
