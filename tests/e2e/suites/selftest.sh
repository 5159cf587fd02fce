# shellcheck shell=bash
# selftest: the harness checks itself, so that a green e2e run means the
# checks ran. A guest that passes is seen to pass; a failing check, a guest
# that dies without finishing, a guest that hangs, and a device server that
# exits at start are each seen as failures, with the reason.
E2E_SUITES+=(selftest)

# selftest_expect_failure WHAT REGEX: the failures recorded since the last
# call are exactly what the case was meant to provoke; they are then cleared.
selftest_expect_failure() {
    local what=$1 re=$2 got
    got=$(printf '%s\n' "${E2E_FAILURES[@]}")
    E2E_FAILURES=()
    if [ -z "$got" ]; then
        e2e_fail "selftest: $what was not detected"
    elif ! grep -Eq -- "$re" <<<"$got"; then
        e2e_fail "selftest: $what was reported as '$got', expected /$re/"
    else
        e2e_host_pass "selftest: $what detected: $(head -n 1 <<<"$got")"
    fi
}

suite_selftest() {
    e2e_vm_start ok selftest.sh ok "" min 256 SELFTEST_VALUE="a 'quoted' value" -- || return
    e2e_vm_wait ok 120
    e2e_vm_expect ok hello config
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

    VDEVD_E2E_VDEVD=/bin/false e2e_vdevd_start dead "$E2E_RUN_DIR/dead.sock" nvme
    selftest_expect_failure "a device server that exits at start" "exited with status 1 before listening"
}

# The NVMe checks fail when the controller misbehaves (QEMU's nvme, made to):
#  - writes never reach the backing file (an overlay takes them): the host's
#    durability check fails although the guest reads its writes back;
#  - every read fails (blkdebug): the pattern check fails;
#  - the namespace is not the size the run expects: bind fails.
E2E_SUITES+=(selftest-nvme)
suite_selftest_nvme() {
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
        "backing file differs from what guest 'lost-writes' read"

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
