# shellcheck shell=sh
# The smallest guest script: proves that a guest boots, runs /init and
# reports back. Used by the KVM probe and the harness self-test.
check_hello() {
    [ -r /proc/version ] || die "no /proc"
    info "hello kernel=$(uname -r) cpus=$(nproc) mem_kib=$(sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo)"
}
phase_hello() { check hello check_hello; }
