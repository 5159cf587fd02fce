# shellcheck shell=sh
# Passthrough checks, inside a guest with an IOMMU (intel-iommu) and three
# QEMU edu devices: EDU0 and EDU1 behind one PCI bridge (one IOMMU group,
# one reset domain: one device set), EDU2 on the root bus (its own group).
# The edu devices are bound to vfio-pci; vdevd serves them over vfio-user
# (`vdevd --config`, passthrough devices sharing the address space vm1);
# ptcheck plays the VMM. Sourced by /init.
#
# Config: PT_IOMMU (group | iommufd), EDU0 EDU1 EDU2 (PCI addresses).

PT_BIN=/e2e/bin
CTL=/tmp/ctl.sock

ctl() { "$PT_BIN/vdevd" ctl --socket "$CTL" "$@"; }
# field NAME KEY: a field of `vdevd ctl status NAME` (JSON on one line).
field() { ctl status "$1" | sed -n "s/.*\"$2\":\\([^,}]*\\).*/\\1/p" | tr -d '"'; }
expect_field() {
    _v=$(field "$1" "$2")
    [ "$_v" = "$3" ] || die "$1: $2 is '$_v', expected '$3' ($(ctl status "$1"))"
}

check_bind() {
    for bdf in "$EDU0" "$EDU1" "$EDU2"; do
        d=/sys/bus/pci/devices/$bdf
        wait_for 10 test -e "$d/vendor" || die "no PCI function at $bdf (lspci: $(lspci -n | tr '\n' ';'))"
        [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1234:0x11e8" ] || die "$bdf is not an edu device"
        echo vfio-pci >"$d/driver_override"
        echo "$bdf" >/sys/bus/pci/drivers_probe
        [ "$(basename "$(readlink "$d/driver")")" = vfio-pci ] || die "$bdf did not bind to vfio-pci"
        group=$(basename "$(readlink "$d/iommu_group")")
        info "iommu-group $bdf $group"
        if [ "$PT_IOMMU" = iommufd ]; then
            ls "$d/vfio-dev/" || die "$bdf has no VFIO device cdev"
        else
            test -c "/dev/vfio/$group" || die "no /dev/vfio/$group"
        fi
    done
    g0=$(basename "$(readlink "/sys/bus/pci/devices/$EDU0/iommu_group")")
    g1=$(basename "$(readlink "/sys/bus/pci/devices/$EDU1/iommu_group")")
    g2=$(basename "$(readlink "/sys/bus/pci/devices/$EDU2/iommu_group")")
    [ "$g0" = "$g1" ] || die "the edu devices behind one bridge are in groups $g0 and $g1"
    [ "$g0" != "$g2" ] || die "the edu device on the root bus shares group $g0"
    ls -l /dev/vfio /dev/vfio/devices 2>/dev/null || true
}

listening() { [ -S /tmp/edu0.sock ] && [ -S /tmp/edu1.sock ] && [ -S /tmp/edu2.sock ] && [ -S "$CTL" ]; }

check_start() {
    {
        echo "ctl_socket = \"$CTL\""
        i=0
        for bdf in "$EDU0" "$EDU1" "$EDU2"; do
            printf '[[device]]\ntype = "passthrough"\nname = "edu%s"\nsocket = "/tmp/edu%s.sock"\n' "$i" "$i"
            printf 'device = "%s"\niommu = "%s"\naddress_space = "vm1"\n' "$bdf" "$PT_IOMMU"
            i=$((i + 1))
        done
    } >/tmp/vdevd.toml
    cat /tmp/vdevd.toml
    RUST_LOG=info "$PT_BIN/vdevd" --config /tmp/vdevd.toml >/tmp/vdevd.log 2>&1 &
    echo $! >/tmp/vdevd.pid
    wait_for 30 listening || die "vdevd did not listen: $(tail -n 20 /tmp/vdevd.log)"
    cat /tmp/vdevd.log
}

# ptcheck's PASS lines become checks of their own.
check_basic() {
    "$PT_BIN/ptcheck" basic /tmp/edu0.sock | tee /tmp/basic.out
}
basic_results() {
    for c in id-register liveness factorial dma msi reset; do
        if grep -q "^PASS $c\$" /tmp/basic.out 2>/dev/null; then
            pass "$c"
        else
            fail "$c" "$(grep "$c\|ptcheck" /tmp/basic.out 2>/dev/null | head -n 1)"
        fi
    done
}

check_device_set() {
    "$PT_BIN/ptcheck" get-fact /tmp/edu1.sock 3628800 >/dev/null || true
    s0=$(field edu0 device_set)
    s1=$(field edu1 device_set)
    s2=$(field edu2 device_set)
    info "device-sets edu0=$s0 edu1=$s1 edu2=$s2"
    if [ -z "$s0" ] || [ "$s0" != "$s1" ]; then die "edu0 and edu1 are in sets '$s0' and '$s1'"; fi
    [ "$s0" != "$s2" ] || die "edu2 shares the set $s0"
    # Each client session opened its device once and closed it once.
    for d in edu0 edu1; do
        expect_field "$d" opens 1
        expect_field "$d" closes 1
        expect_field "$d" open false
    done
    expect_field edu2 opens 0
    grep -q "device set $s0: opened edu0" /tmp/vdevd.log ||
        die "no open of edu0 under its set in the log"
    grep -q "device set $s0: closed" /tmp/vdevd.log || die "no close under the set in the log"
}

holding() { grep -q "^holding edu0" /tmp/hold.out; }
edu0_closed() { [ "$(field edu0 open)" = false ]; }
vdevd_gone() { ! kill -0 "$(cat /tmp/vdevd.pid)" 2>/dev/null; }

check_external_ref() {
    # The holder is vdevd ctl itself (not a subshell), so that killing it
    # is the holder dying.
    "$PT_BIN/vdevd" ctl --socket "$CTL" hold edu0 >/tmp/hold.out 2>&1 &
    hold=$!
    wait_for 20 holding || die "vdevd ctl hold: $(cat /tmp/hold.out)"
    expect_field edu0 open true
    expect_field edu0 opens 2
    "$PT_BIN/ptcheck" set-fact /tmp/edu0.sock 5 || die "factorial(5) on edu0"
    expect_field edu0 client false
    expect_field edu0 open true
    # A new client finds the device as the last one left it: still open,
    # never reopened, the factorial register holding 5! = 120.
    "$PT_BIN/ptcheck" get-fact /tmp/edu0.sock 120 || die "the device state did not survive the reconnect"
    expect_field edu0 opens 2
    expect_field edu0 closes 1
    kill "$hold"
    wait "$hold" || true
    wait_for 10 edu0_closed || die "the device stayed open after its holder died: $(ctl status edu0)"
    expect_field edu0 closes 2
    grep -q "gone.*dropping its 1 reference" /tmp/vdevd.log || die "the holder's death is not in the log"
}

check_shared_space() {
    "$PT_BIN/ptcheck" shared /tmp/edu0.sock /tmp/edu2.sock | tee /tmp/shared.out
    grep -q "^PASS shared-address-space" /tmp/shared.out
}

# vdevd used the kernel interface asked for, and only that one; the reset
# of EDU0 (no function reset) was a hot reset of its bus, EDU1 included.
check_kernel_path() {
    grep "address space vm1" /tmp/vdevd.log
    grep -q "vfio-$EDU0: hot reset of its reset domain (also reset: $EDU1)" /tmp/vdevd.log ||
        die "no hot reset of $EDU0 with $EDU1 in the log"
    if [ "$PT_IOMMU" = iommufd ]; then
        grep -q "address space vm1: new iommufd IOAS" /tmp/vdevd.log || die "no iommufd IOAS in the log"
        if grep -q "new VFIO container" /tmp/vdevd.log; then die "a VFIO container was opened"; fi
    else
        grep -q "address space vm1: new VFIO container" /tmp/vdevd.log || die "no VFIO container in the log"
        if grep -q "new iommufd IOAS" /tmp/vdevd.log; then die "an iommufd IOAS was opened"; fi
    fi
}

check_stop() {
    kill -TERM "$(cat /tmp/vdevd.pid)"
    wait_for 15 vdevd_gone || die "vdevd did not exit on SIGTERM"
    tail -n 40 /tmp/vdevd.log
}

phase_passthrough() {
    check bind check_bind || return 0
    check start check_start || return 0
    check basic check_basic
    basic_results
    check device-set check_device_set
    check external-ref check_external_ref
    check shared-space check_shared_space
    check kernel-path check_kernel_path
    check stop check_stop
    echo "---- vdevd log"
    cat /tmp/vdevd.log
}
