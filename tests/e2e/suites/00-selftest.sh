# shellcheck shell=bash
# selftest: the harness checks itself, so that a green e2e run means the
# checks ran. A guest that passes is seen to pass; a failing check, a guest
# that dies without finishing, a guest that hangs, and a device server that
# exits at start are each seen as failures, with the reason.
E2E_SUITES+=(selftest selftest-pci selftest-nvme)
# Failures the self-tests provoke are labelled as such in the output.
selftest_provoking() {
    # shellcheck disable=SC2034 # read by e2e_fail
    E2E_FAIL_LABEL="provoked failure (checked below)"
}

# selftest_expect_failure WHAT REGEX...: the failures recorded since the
# last call are exactly what the case was meant to provoke: each REGEX
# matches one of them and each of them matches a REGEX. They are then cleared.
selftest_expect_failure() {
    local what=$1 re f ok=1 matched
    shift
    local -a got=("${E2E_FAILURES[@]}")
    # shellcheck disable=SC2034 # read by e2e_fail
    local E2E_FAIL_LABEL=FAIL
    E2E_FAILURES=()
    if [ "${#got[@]}" = 0 ]; then
        e2e_fail "selftest: $what was not detected"
        return
    fi
    for re in "$@"; do
        matched=0
        for f in "${got[@]}"; do grep -Eq -- "$re" <<<"$f" && matched=1; done
        [ "$matched" = 1 ] || { e2e_fail "selftest: $what: no failure matches /$re/"; ok=0; }
    done
    for f in "${got[@]}"; do
        matched=0
        for re in "$@"; do grep -Eq -- "$re" <<<"$f" && matched=1; done
        [ "$matched" = 1 ] || { e2e_fail "selftest: $what: unexpected failure: $f"; ok=0; }
    done
    [ "$ok" = 0 ] || e2e_host_pass "selftest: $what detected: ${got[0]}"
}

suite_selftest() {
    selftest_provoking
    echo "file for the guest $BASHPID" >"$E2E_RUN_DIR/extra.txt"
    E2E_VM_FILES="$E2E_RUN_DIR/extra.txt:/e2e/extra/extra.txt" E2E_VM_APPEND="e2e.selftest=1" \
        e2e_vm_start ok selftest.sh ok "" min 256 SELFTEST_VALUE="a 'quoted' value" -- || return
    e2e_vm_wait ok 120
    e2e_vm_expect ok hello config extras
    [ "$(e2e_vm_info ok extra-file)" = "file for the guest $BASHPID" ] || e2e_fail "selftest: E2E_VM_FILES did not reach the guest"
    [ "$(e2e_vm_info ok value)" = "a 'quoted' value" ] || e2e_fail "selftest: INFO value not passed through"

    e2e_vm_start failing selftest.sh failing "" min 256 -- || return
    e2e_vm_wait failing 120
    e2e_vm_expect failing hello failing
    selftest_expect_failure "a failing guest check" "guest 'failing': failing deliberate failure"

    e2e_vm_start missing selftest.sh ok "" min 256 -- || return
    e2e_vm_wait missing 120
    e2e_vm_expect missing hello config never-run
    selftest_expect_failure "a check that never ran" "check 'never-run' did not run"

    e2e_vm_start panic selftest.sh panic "" min 256 -- || return
    e2e_vm_wait panic 120
    selftest_expect_failure "a guest that dies" "stopped without finishing"

    e2e_vm_start hang selftest.sh hang "" min 256 -- || return
    e2e_vm_wait hang 20
    selftest_expect_failure "a guest that hangs" "timed out after .* \\(last started: E2E-RUN hang\\)"

    e2e_vm_start slow selftest.sh slow "" min 256 -- || return
    e2e_vm_wait slow 120
    e2e_vm_expect slow hang hello
    selftest_expect_failure "a check that hangs" "guest 'slow': hang check hang timed out after 3 s"

    VDEVD_E2E_VDEVD=/bin/false e2e_vdevd_start dead "$E2E_RUN_DIR/dead.sock" nvme
    selftest_expect_failure "a device server that exits at start" "exited with status 1 before listening"

    # A name is the key a pid is recorded under: reusing one would lose a
    # process. The library refuses it.
    if (e2e_spawn dead vdevd /dev/null true) 2>/dev/null; then
        e2e_fail "selftest: a process name used twice was accepted"
    else
        e2e_host_pass "selftest: a process name used twice is refused"
    fi
}

# The NVMe checks fail when the controller misbehaves (QEMU's nvme, made to):
#  - writes never reach the backing file (an overlay takes them): the host's
#    durability check fails although the guest reads its writes back;
#  - every read fails (blkdebug): the pattern check fails;
#  - the namespace is not the size the run expects: bind fails.
suite_selftest_nvme() {
    selftest_provoking
    local img=$E2E_RUN_DIR/nvme.img size=$((32 * 1048576)) seed=$RANDOM
    local -a cfg=(E2E_NVME_BDF="$E2E_NVME_BDF" E2E_SEED="$seed")
    local nvme='{"driver":"nvme","serial":"selftest","drive":"disk0","bus":"pcie.0","addr":"0x4"}'
    truncate -s "$size" "$img"

    e2e_vm_start lost-writes nvme.sh checks "nvme" blk 256 "${cfg[@]}" E2E_EXPECT_BYTES="$size" \
        E2E_NVME_CHECKS="bind lba-edges final-state" -- \
        -drive "file=$img,if=none,id=disk0,format=raw,snapshot=on" -device "$nvme" || return
    e2e_vm_wait lost-writes 300
    e2e_vm_expect lost-writes bind lba-edges final-state
    [ "${#E2E_FAILURES[@]}" = 0 ] || return
    nvme_check_file lost-writes "$img" "$seed"
    selftest_expect_failure "writes that never reach the backing file" \
        "backing file differs from what guest 'lost-writes' read" \
        "the last MiB of the backing file is not the tail pattern"

    local blkdebug
    blkdebug="{\"driver\":\"raw\",\"node-name\":\"disk0\",\"file\":{\"driver\":\"blkdebug\",\"image\":{\"driver\":\"file\",\"filename\":\"$img\"},\"inject-error\":[{\"event\":\"read_aio\",\"errno\":5}]}}"
    e2e_vm_start read-errors nvme.sh checks "nvme" blk 256 "${cfg[@]}" E2E_EXPECT_BYTES="$size" \
        E2E_NVME_CHECKS="bind pattern" -- -blockdev "$blkdebug" -device "$nvme" || return
    e2e_vm_wait read-errors 300
    e2e_vm_expect read-errors bind pattern
    selftest_expect_failure "a controller whose reads fail" "guest 'read-errors': pattern fio pattern write/verify"

    e2e_vm_start wrong-size nvme.sh checks "nvme" blk 256 "${cfg[@]}" E2E_EXPECT_BYTES=$((size + 4096)) \
        E2E_NVME_CHECKS="bind" -- -drive "file=$img,if=none,id=disk0,format=raw" -device "$nvme" || return
    e2e_vm_wait wrong-size 300
    e2e_vm_expect wrong-size bind
    selftest_expect_failure "a namespace of the wrong size" "guest 'wrong-size': bind namespace nvme0n1 is $size bytes, expected"
}

# The PCI register checks fail on a device that does not behave: QEMU's edu
# with a wrong expected ID, a liveness register that is not one (edu's
# factorial register), and a "memory" BAR range that keeps nothing.
suite_selftest_pci() {
    selftest_provoking
    e2e_vm_start edu-wrong pci.sh pci "" pci 256 PCI_BDF=0000:00:04.0 PCI_VENDOR=0x1234 PCI_DEVICE=0x11e8 \
        PCI_ID_BAR=0 PCI_ID_OFF=0x0 PCI_ID_VALUE=0x010000ee PCI_LIVE_BAR=0 PCI_LIVE_OFF=0x8 \
        PCI_MEM_BAR=0 PCI_MEM_LEN=256 PCI_CHECKS="enumerate id-register liveness mem-bar" -- \
        -device '{"driver":"edu","bus":"pcie.0","addr":"0x4"}' || return
    e2e_vm_wait edu-wrong 300
    e2e_vm_expect edu-wrong enumerate id-register liveness mem-bar
    selftest_expect_failure "wrong register values" \
        "id-register ID register BAR0\+0x0 is 0x10000ed, expected 0x010000ee" \
        "liveness liveness register: wrote 0x00000000, read 0x1, expected the inverse" \
        "mem-bar BAR0 does not keep what was written"

    # A DMA that cannot happen (bus mastering left off), an interrupt that is
    # never raised (the "raise" write goes to the liveness register), and a
    # factorial unit that is not where the layout says.
    e2e_vm_start edu-broken pci.sh pci "" pci 256 PCI_BDF=0000:00:04.0 PCI_VENDOR=0x1234 PCI_DEVICE=0x11e8 \
        PCI_KIND=edu PCI_DMA_NO_MASTER=1 PCI_INTX="- 0x04=1 0x64=1" PCI_CHECKS="enumerate dma intx" -- \
        -device '{"driver":"edu","bus":"pcie.0","addr":"0x4"}' || return
    e2e_vm_wait edu-broken 300
    e2e_vm_expect edu-broken enumerate dma intx
    selftest_expect_failure "DMA and interrupts that do not happen" \
        "dma device DMA to/from guest memory misbehaved" \
        "intx INTx through uio_pci_generic failed"
    e2e_vm_start edu-sample pci.sh pci "" pci 256 PCI_BDF=0000:00:04.0 PCI_VENDOR=0x1234 PCI_DEVICE=0x11e8 \
        PCI_KIND=sample PCI_CHECKS="enumerate factorial dma" -- \
        -device '{"driver":"edu","bus":"pcie.0","addr":"0x4"}' || return
    e2e_vm_wait edu-sample 300
    e2e_vm_expect edu-sample enumerate factorial dma
    selftest_expect_failure "the sample layout on another device" \
        "factorial (20! read as|factorial still busy)" \
        "dma device DMA to/from guest memory misbehaved"
}
