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
    e2e_vm_start ok selftest.sh ok "" blk 256 SELFTEST_VALUE="a 'quoted' value" -- || return
    e2e_vm_wait ok 120
    e2e_vm_expect ok hello config
    [ "$(e2e_vm_info ok value)" = "a 'quoted' value" ] || e2e_fail "selftest: INFO value not passed through"

    e2e_vm_start failing selftest.sh failing "" blk 256 -- || return
    e2e_vm_wait failing 120
    e2e_vm_expect failing hello failing
    selftest_expect_failure "a failing guest check" "guest 'failing': failing deliberate failure"

    e2e_vm_start missing selftest.sh ok "" blk 256 -- || return
    e2e_vm_wait missing 120
    e2e_vm_expect missing hello config never-run
    selftest_expect_failure "a check that never ran" "check 'never-run' did not run"

    e2e_vm_start panic selftest.sh panic "" blk 256 -- || return
    e2e_vm_wait panic 120
    selftest_expect_failure "a guest that dies" "stopped without finishing"

    e2e_vm_start hang selftest.sh hang "" blk 256 -- || return
    e2e_vm_wait hang 20
    selftest_expect_failure "a guest that hangs" "timed out after .* \\(last started: E2E-RUN hang\\)"

    VDEVD_E2E_VDEVD=/bin/false e2e_vdevd_start dead "$E2E_RUN_DIR/dead.sock" nvme
    selftest_expect_failure "a device server that exits at start" "exited with status 1 before listening"
}
