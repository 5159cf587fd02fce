# shellcheck shell=bash
# Passthrough suites: real VFIO inside a TCG guest. QEMU gives the guest an
# IOMMU (intel-iommu, caching-mode=on) and three edu devices: two behind one
# PCI bridge (one IOMMU group, one reset domain) and one on the root bus.
# Inside the guest the edu devices are bound to vfio-pci, vdevd serves them
# (`vdevd --config` with three passthrough devices in one address space and a
# control socket), and ptcheck (tests/src/bin/ptcheck.rs) is the VMM:
#   passthrough          group/container path (Debian's 6.12 guest kernel)
#   passthrough-iommufd  cdev/iommufd path (/dev/vfio/devices, /dev/iommu) on
#                        the kernel tests/e2e/kernel/build.sh builds (Debian's
#                        kernels have neither IOMMUFD nor VFIO_DEVICE_CDEV)
# Checks (guest/passthrough.sh): the edu ID and liveness registers, the
# factorial, DMA both ways between client memory and the device through the
# real IOMMU, the MSI delivered to the client's eventfd, DEVICE_RESET (a hot
# reset of the bridged pair's bus); the device set of
# the two bridged devices and exact open/close counts; an external
# reference (vdevd ctl hold) keeping a device open, with its state, across
# a client reconnect, and dropped when its holder dies; a second device
# attached to the same address space using a mapping made through the
# first; vdevd exiting on SIGTERM.
E2E_SUITES+=(passthrough passthrough-iommufd)

E2E_PT_CHECKS="bind start basic id-register liveness factorial dma msi reset device-set external-ref shared-space kernel-path stop"

# e2e_pt_binaries: build vdevd and ptcheck; print their paths.
e2e_pt_binaries() {
    local vdevd target=${CARGO_TARGET_DIR:-$E2E_REPO/target}
    vdevd=$(e2e_vdevd_binary) || return 1
    if [ "${E2E_PTCHECK_BUILT:-0}" != 1 ]; then
        e2e_log "building ptcheck (cargo build -p vdevd-tests --bin ptcheck)"
        (cd "$E2E_REPO" && timeout 3600 cargo build -q -p vdevd-tests --bin ptcheck) >&2 ||
            e2e_die "cargo build of ptcheck failed"
        E2E_PTCHECK_BUILT=1
        export E2E_PTCHECK_BUILT
    fi
    printf '%s %s\n' "$vdevd" "$target/debug/ptcheck"
}

# e2e_pt_run NAME IOMMU MODULES: one guest running every passthrough check.
e2e_pt_run() {
    local name=$1 iommu=$2 modules=$3 bins
    bins=$(e2e_pt_binaries) || return
    read -r -a bins <<<"$bins"
    # shellcheck disable=SC2054 # commas belong to QEMU's option syntax
    E2E_VM_FILES="${bins[0]}:/e2e/bin/vdevd ${bins[1]}:/e2e/bin/ptcheck" \
        E2E_VM_APPEND="intel_iommu=on" \
        e2e_vm_start "$name" passthrough.sh passthrough "$modules" vfio 512 PT_IOMMU="$iommu" \
        EDU0=0000:01:01.0 EDU1=0000:01:02.0 EDU2=0000:00:04.0 -- \
        -device '{"driver":"intel-iommu","caching-mode":true}' \
        -device '{"driver":"edu","bus":"pcie.0","addr":"0x4"}' \
        -device '{"driver":"pci-bridge","id":"br1","bus":"pcie.0","addr":"0x5","chassis_nr":1}' \
        -device '{"driver":"edu","bus":"br1","addr":"0x1"}' \
        -device '{"driver":"edu","bus":"br1","addr":"0x2"}' || return
    e2e_vm_wait "$name" 300
    # shellcheck disable=SC2086 # a list
    e2e_vm_expect "$name" $E2E_PT_CHECKS
}

suite_passthrough() {
    e2e_pt_run pt group "vfio-pci vfio_iommu_type1"
}

suite_passthrough_iommufd() {
    local kernel
    kernel=$("$E2E_DIR/kernel/build.sh") || { e2e_fail "tests/e2e/kernel/build.sh failed"; return; }
    # QEMU runs in the trixie root, which sees the run directory.
    cp "$kernel" "$E2E_RUN_DIR/bzImage-iommufd" || { e2e_fail "cannot copy $kernel"; return; }
    # Everything is built into that kernel: no modules to load.
    E2E_VM_KERNEL=$E2E_RUN_DIR/bzImage-iommufd e2e_pt_run pt-iommufd iommufd ""
}
