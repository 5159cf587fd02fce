# shellcheck shell=sh
# Guest side of the harness self-test (suites/selftest.sh).
check_hello() { [ -r /proc/version ] || die "no /proc"; }
check_config() {
    [ "$E2E_SUITE" = selftest ] || die "E2E_SUITE is '$E2E_SUITE'"
    info "value $SELFTEST_VALUE"
}
check_extras() {
    grep -qw e2e.selftest=1 /proc/cmdline || die "E2E_VM_APPEND not on the kernel command line"
    info "extra-file $(cat /e2e/extra/extra.txt)"
}
check_failing() { die "deliberate failure"; }
check_hang() { sleep 3600; }
phase_ok() {
    check hello check_hello
    check config check_config
    [ ! -e /e2e/extra ] || check extras check_extras
}
phase_failing() {
    check hello check_hello
    check failing check_failing
}
# PID 1 exiting panics the kernel (QEMU exits without E2E-DONE).
phase_panic() { exit 1; }
phase_hang() { check hang check_hang; }
# A check that hangs is stopped by the guest's own watchdog.
phase_slow() {
    # shellcheck disable=SC2034 # read by check (lib.sh)
    E2E_CHECK_TIMEOUT=3
    check hang check_hang
    check hello check_hello
}
