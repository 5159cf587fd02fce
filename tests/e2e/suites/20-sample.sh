# shellcheck shell=bash
# PCI register-level suites, checked from guest user space with no driver:
#   sample       vdevd's sample device over vfio-user (`vdevd sample --socket S`):
#                the same, plus factorial, the mmappable buffer, DMA both ways
#                (and its errors), INTx; then a client killed during DMA, and
#                a third client served after it
#   sample-qemu  QEMU's edu device: proves the guest side (enumeration,
#                config space, ID and liveness registers through
#                /sys/bus/pci/devices/*/resource0 with the pcimem helper,
#                factorial, DMA with dmatest, INTx through uio_pci_generic)
E2E_SUITES+=(sample-qemu sample)

E2E_PCI_BDF=0000:00:04.0

suite_sample_qemu() {
    e2e_vm_start edu pci.sh pci "" pci 256 PCI_BDF="$E2E_PCI_BDF" PCI_VENDOR=0x1234 PCI_DEVICE=0x11e8 \
        PCI_ID_BAR=0 PCI_ID_OFF=0x0 PCI_ID_VALUE=0x010000ed PCI_LIVE_BAR=0 PCI_LIVE_OFF=0x4 \
        PCI_KIND=edu PCI_INTX="- 0x60=1 0x64=1" \
        PCI_CHECKS="enumerate config id-register liveness factorial dma intx" -- \
        -device '{"driver":"edu","bus":"pcie.0","addr":"0x4"}' || return
    e2e_vm_wait edu 300
    e2e_vm_expect edu enumerate config id-register liveness factorial dma intx
}

# The sample device's identity and register layout, as its model defines
# them (devices/src/sample/mod.rs); each is a setting so that the suite can
# follow the model, or be pointed at another vfio-user server:
#   VDEVD_E2E_SAMPLE_IDS   "VENDOR:DEVICE"
#   VDEVD_E2E_SAMPLE_ID    "BAR OFFSET VALUE" of the ID register
#   VDEVD_E2E_SAMPLE_LIVE  "BAR OFFSET" of the liveness register (X in, ~X out)
#   VDEVD_E2E_SAMPLE_MMAP  "BAR LENGTH" of the buffer the server lets QEMU
#                          mmap: the guest fills and checks it, and QEMU's
#                          trace must show the mapping (vfio_region_mmap)
#   VDEVD_E2E_SAMPLE_INTX  "ENABLE RAISE ACK" register writes for INTx
#   VDEVD_E2E_SAMPLE_CHECKS the guest checks (factorial and dma know the
#                          sample layout only)
: "${VDEVD_E2E_SAMPLE_IDS:=0x1234:0x5344}"
: "${VDEVD_E2E_SAMPLE_ID:=0 0x0 0x53440100}"
: "${VDEVD_E2E_SAMPLE_LIVE:=0 0x4}"
: "${VDEVD_E2E_SAMPLE_MMAP:=2 65536}"
: "${VDEVD_E2E_SAMPLE_INTX:=0x24=4 0x28=4 0x2c=4}"
: "${VDEVD_E2E_SAMPLE_CHECKS:=enumerate config id-register liveness factorial mem-bar dma intx}"

suite_sample() {
    local sock=$E2E_RUN_DIR/sample.sock checks=$VDEVD_E2E_SAMPLE_CHECKS id live mmap
    local -a cfg=(PCI_BDF="$E2E_PCI_BDF" PCI_KIND=sample PCI_INTX="$VDEVD_E2E_SAMPLE_INTX"
        PCI_VENDOR="${VDEVD_E2E_SAMPLE_IDS%%:*}" PCI_DEVICE="${VDEVD_E2E_SAMPLE_IDS#*:}")
    read -r -a id <<<"$VDEVD_E2E_SAMPLE_ID"
    read -r -a live <<<"$VDEVD_E2E_SAMPLE_LIVE"
    read -r -a mmap <<<"$VDEVD_E2E_SAMPLE_MMAP"
    [ "${#id[@]}" != 3 ] || cfg+=(PCI_ID_BAR="${id[0]}" PCI_ID_OFF="${id[1]}" PCI_ID_VALUE="${id[2]}")
    [ "${#live[@]}" != 2 ] || cfg+=(PCI_LIVE_BAR="${live[0]}" PCI_LIVE_OFF="${live[1]}")
    [ "${#mmap[@]}" != 2 ] || cfg+=(PCI_MEM_BAR="${mmap[0]}" PCI_MEM_LEN="${mmap[1]}")
    e2e_vdevd_start vdevd "$sock" sample --socket "$sock" || return
    VDEVD_E2E_QEMU_TRACE=${VDEVD_E2E_QEMU_TRACE:-vfio_region_mmap} \
        e2e_vm_start sample pci.sh pci "" pci 256 "${cfg[@]}" PCI_CHECKS="$checks" -- \
        -device "$(e2e_vfio_user_device "$sock" 0x4)" || return
    e2e_vm_wait sample 300
    # shellcheck disable=SC2086 # $checks is a list
    e2e_vm_expect sample $checks
    if [ "${#mmap[@]}" = 2 ]; then
        if grep -q "vfio_region_mmap .* BAR ${mmap[0]} mmaps" "${E2E_LOG[sample]}/qemu.log"; then
            e2e_host_pass "QEMU mmapped BAR${mmap[0]} (vfio_region_mmap)"
        else
            e2e_fail "QEMU did not mmap BAR${mmap[0]}: no vfio_region_mmap for it in its trace"
        fi
    fi
    # The server outlives its client and serves the next one, also when
    # that client is killed in the middle of DMA and register traffic.
    if ! e2e_is_alive vdevd || ! e2e_unix_listening "$sock"; then
        e2e_fail "vdevd does not listen any more after its first client powered off"
        return
    fi
    e2e_vm_start busy pci.sh busy "" pci 256 "${cfg[@]}" PCI_CHECKS="enumerate" -- \
        -device "$(e2e_vfio_user_device "$sock" 0x4)" || return
    if e2e_vm_wait_for busy '^E2E-MARK busy' 300; then
        sleep 2
        e2e_vm_kill busy
        e2e_host_pass "QEMU killed during DMA and register traffic"
    else
        e2e_fail "guest 'busy' never got busy"
        e2e_vm_kill busy
    fi
    e2e_vm_expect busy enumerate
    sleep 1
    if ! e2e_is_alive vdevd || ! e2e_unix_listening "$sock"; then
        e2e_fail "vdevd does not listen any more after its client was killed"
        return
    fi
    e2e_vm_start again pci.sh pci "" pci 256 "${cfg[@]}" PCI_CHECKS="enumerate id-register liveness factorial dma" -- \
        -device "$(e2e_vfio_user_device "$sock" 0x4)" || return
    e2e_vm_wait again 300
    e2e_vm_expect again enumerate id-register liveness factorial dma
    e2e_vdevd_stop vdevd
}
