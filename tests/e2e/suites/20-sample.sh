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
# them (devices/src/sample.rs); the values below are the ones this suite
# checks, and must change with the model.
: "${VDEVD_E2E_SAMPLE_IDS:=0x1b36:0x0000}"

suite_sample() {
    local sock=$E2E_RUN_DIR/sample.sock
    e2e_vdevd_start sample "$sock" sample --socket "$sock" || return
    VDEVD_E2E_QEMU_TRACE=${VDEVD_E2E_QEMU_TRACE:-vfio_region_mmap} \
        e2e_vm_start sample pci.sh pci "" pci 256 PCI_BDF="$E2E_PCI_BDF" \
        PCI_VENDOR="${VDEVD_E2E_SAMPLE_IDS%%:*}" PCI_DEVICE="${VDEVD_E2E_SAMPLE_IDS#*:}" \
        PCI_CHECKS="enumerate config" -- \
        -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"$sock\"},\"bus\":\"pcie.0\",\"addr\":\"0x4\"}" || return
    e2e_vm_wait sample 300
    e2e_vm_expect sample enumerate config
    e2e_vdevd_stop sample
}
