# shellcheck shell=sh
# Register-level checks of one PCI function from guest user space, with no
# driver bound: enumeration, config space, an ID register, a liveness
# register, and a BAR that behaves as memory. Sourced by /init.
#
# Config: PCI_BDF, PCI_VENDOR, PCI_DEVICE (0x-prefixed, as in sysfs),
#   PCI_ID_BAR PCI_ID_OFF PCI_ID_VALUE       ID register and its value
#   PCI_LIVE_BAR PCI_LIVE_OFF                liveness: writing X reads ~X
#   PCI_MEM_BAR PCI_MEM_LEN                  memory BAR to fill and check
#                                            (empty: no such BAR)
#   PCI_KIND                                 sample | edu: the register
#                                            layout of factorial and dma
#   PCI_INTX "ENABLE RAISE ACK"              register writes OFF=VAL that
#                                            enable, raise and acknowledge
#                                            an interrupt (ENABLE may be -)
#   PCI_CHECKS                               the checks to run, in order

dev() { echo "/sys/bus/pci/devices/$PCI_BDF"; }
present() { [ -e "$(dev)/vendor" ]; }

check_enumerate() {
    wait_for 10 present || die "no PCI function at $PCI_BDF (lspci: $(lspci -n | tr '\n' ';'))"
    v=$(cat "$(dev)/vendor")
    d=$(cat "$(dev)/device")
    [ "$v:$d" = "$PCI_VENDOR:$PCI_DEVICE" ] || die "function at $PCI_BDF is $v:$d, expected $PCI_VENDOR:$PCI_DEVICE"
    info "pci $PCI_BDF $v:$d class=$(cat "$(dev)/class") $(lspci -nn -s "$PCI_BDF" | cut -d' ' -f2- | tr ' ' _)"
    head -n 6 "$(dev)/resource"
    # Memory decoding on, so that BAR accesses reach the device.
    echo 1 >"$(dev)/enable"
}

check_config() {
    # Config space as the guest reads it: IDs agree with sysfs, and the
    # capability list (if any) is well formed (lspci walks it).
    [ "0x$(setpci -s "$PCI_BDF" VENDOR_ID.w)" = "$PCI_VENDOR" ] || die "config VENDOR_ID differs from sysfs"
    [ "0x$(setpci -s "$PCI_BDF" DEVICE_ID.w)" = "$PCI_DEVICE" ] || die "config DEVICE_ID differs from sysfs"
    lspci -vvv -nn -s "$PCI_BDF" >/tmp/lspci.txt || die "lspci -vvv failed"
    cat /tmp/lspci.txt
    if grep -q 'Capabilities: \[.*\] <chain broken>' /tmp/lspci.txt; then die "broken capability chain"; fi
}

reg() { pcimem "$(dev)/resource$1" "$2" 32 ${3:+"$3"}; }

check_id_register() {
    got=$(reg "$PCI_ID_BAR" "$PCI_ID_OFF") || die "cannot read BAR$PCI_ID_BAR+$PCI_ID_OFF"
    [ $((got)) = $((PCI_ID_VALUE)) ] || die "ID register BAR$PCI_ID_BAR+$PCI_ID_OFF is $got, expected $PCI_ID_VALUE"
}

check_liveness() {
    for x in 0x00000000 0xffffffff 0x12345678 0xa5a5a5a5 "$(($(date +%s) & 0xffffffff))"; do
        reg "$PCI_LIVE_BAR" "$PCI_LIVE_OFF" "$x" || die "cannot write BAR$PCI_LIVE_BAR+$PCI_LIVE_OFF"
        got=$(reg "$PCI_LIVE_BAR" "$PCI_LIVE_OFF")
        [ $((got)) = $((~x & 0xffffffff)) ] || die "liveness register: wrote $x, read $got, expected the inverse"
    done
}

check_mem_bar() {
    [ -n "$PCI_MEM_BAR" ] || die "no memory BAR configured"
    r=$(dev)/resource$PCI_MEM_BAR
    [ -e "$r" ] || die "BAR$PCI_MEM_BAR does not exist"
    # Two different patterns, so that a BAR that keeps nothing, or only
    # the first thing written, is caught.
    for seed in 1 "$(date +%s)"; do
        pcimem "$r" 0 fill "$PCI_MEM_LEN" "$seed" || die "filling BAR$PCI_MEM_BAR failed"
        pcimem "$r" 0 check "$PCI_MEM_LEN" "$seed" || die "BAR$PCI_MEM_BAR does not keep what was written (seed $seed)"
    done
}

# The factorial unit: sample (FACT_INPUT 0x10, STATUS 0x0c bit 0, 64-bit
# FACT_RESULT 0x18) or edu (0x08 in and out, status 0x20 bit 0).
fact_idle() { [ $(($(reg 0 "$1") & 1)) = 0 ]; }
check_factorial() {
    case "$PCI_KIND" in
        sample) n=20 want=2432902008176640000 in=0x10 status=0x0c out=0x18 width=64 ;;
        edu) n=12 want=479001600 in=0x08 status=0x20 out=0x08 width=32 ;;
        *) die "no factorial layout for PCI_KIND='$PCI_KIND'" ;;
    esac
    reg 0 "$in" "$n"
    wait_for 5 fact_idle "$status" || die "factorial still busy after 5 s"
    got=$(pcimem "$(dev)/resource0" "$out" "$width")
    # busybox arithmetic is signed 64-bit; compare as text
    [ "$(printf '%u' "$got")" = "$want" ] || die "$n! read as $got ($(printf '%u' "$got")), expected $want"
}

check_dma() {
    # The pages dmatest locks must keep their guest-physical address.
    echo 0 >/proc/sys/vm/compact_unevictable_allowed
    DMATEST_NO_MASTER=${PCI_DMA_NO_MASTER:-0} dmatest "$PCI_KIND" "$PCI_BDF" ||
        die "device DMA to/from guest memory misbehaved (see the log)"
}

uio_dev() { for u in "$(dev)"/uio/uio*; do [ -e "$u" ] && echo "/dev/${u##*/}" && return 0; done; return 1; }
check_intx() {
    # shellcheck disable=SC2086 # three words
    set -- $PCI_INTX
    [ "$#" = 3 ] || die "PCI_INTX must be 'ENABLE RAISE ACK'"
    modprobe uio_pci_generic || die "modprobe uio_pci_generic failed"
    echo "${PCI_VENDOR#0x} ${PCI_DEVICE#0x}" >/sys/bus/pci/drivers/uio_pci_generic/new_id
    wait_for 5 uio_dev >/dev/null || die "uio_pci_generic did not bind (it needs INTx masking through the command register)"
    u=$(uio_dev)
    wait_for 5 test -c "$u" || die "$u did not appear"
    rc=0
    out=$(uioirq "$u" "$(dev)/config" "$(dev)/resource0" 5 "$1" "$2" "$3") || rc=$?
    echo "$out"
    grep -i uio /proc/interrupts || true
    echo "$PCI_BDF" >/sys/bus/pci/drivers/uio_pci_generic/unbind
    [ "$rc" = 0 ] || die "INTx through uio_pci_generic failed"
    info "intx $out"
}

# The checks, then DMA and register traffic without end, until the host
# kills QEMU (a client that vanishes mid-transfer, as far as the server knows).
phase_busy() {
    phase_pci
    echo 0 >/proc/sys/vm/compact_unevictable_allowed
    (while :; do dmatest "$PCI_KIND" "$PCI_BDF" >/dev/null 2>&1; done) &
    (while :; do pcimem "$(dev)/resource0" "$PCI_LIVE_OFF" 32 0x5a5a5a5a; done) &
    sleep 1
    mark busy
    sleep 3600
}

phase_pci() {
    for c in $PCI_CHECKS; do
        check "$c" "check_$(echo "$c" | tr - _)" || [ "$c" != enumerate ] || return 0
    done
}
