#!/bin/bash
# Boots the iommufd guest kernel (build.sh) under TCG on q35 with a VT-d
# IOMMU (caching mode, interrupt remapping) and two edu devices, binds them to
# vfio-pci, and checks the device-centric VFIO path (/dev/iommu,
# /dev/vfio/devices/vfioN) and the group path with iommufd_test.c.
#
# Usage: check.sh [options]
#   --kernel PATH      boot this bzImage (default: build.sh's, built if needed)
#   --add SRC:DST      put the host file SRC into the initramfs at DST (repeatable),
#                      e.g. --add target/x86_64-unknown-linux-musl/release/vdevd:/bin/vdevd
#   --run FILE         a busybox sh script run in the guest after the built-in
#                      checks, as /e2e/run.sh, with EDU_A and EDU_B set to the two
#                      edu devices (bound to vfio-pci, closed again); it reports with
#                      `echo E2E-PASS <name>` / `echo E2E-FAIL <name> <reason>`
#   --expect NAME      also require `E2E-PASS NAME` (repeatable; for --run's checks)
#   --no-builtin       do not run iommufd_test (boot, bind, then --run only)
#   --timeout SECONDS  for the whole guest run (default 300, times VDEVD_E2E_TIMEOUT_SCALE)
#   --mem MB, --smp N  guest size (default 512, 1)
#   --qemu ARG         one more QEMU argument (repeatable)
#   --keep             keep the run directory after a pass (VDEVD_E2E_KEEP=1 too)
# Exit status 0 if every expected check passed and none failed, 1 otherwise.
# The last line is "iommufd: N passed, N failed". On failure the console is
# printed. QEMU is stopped by its pid on every exit path.
#
# Files of a run, under $VDEVD_E2E_CACHE/run/kernel/<time>.<pid>/:
#   console.log  the guest's console     qemu.log  QEMU's own output
#   cmdline      the QEMU command line   initrd    the initramfs
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

# The checks iommufd_test and init report, in order.
BUILTIN_CHECKS="iommu-on vfio-bind dev-nodes cdev-open cdev-refuses-before-bind group-open-while-cdev-unbound
cdev-bind-refused-while-group-open cdev-bind group-refused-while-cdev-bound ioas-attach cdev-bar cdev-factorial cdev-msi-setup ioas-map
cdev-dma cdev-msi group-open cdev-open-while-group-open group-container group-bar group-msi-setup
group-dma group-msi shared-ioas-bar shared-ioas-msi-setup shared-ioas-dma shared-ioas-msi
shared-ioas-dma-a-again shared-ioas-msi-a-again ioas-unmap group-after-cdev-close"

kernel="" run_script="" builtin=1 timeout=300 mem=512 smp=1 keep=${VDEVD_E2E_KEEP:-0}
adds=() expects=() qemu_extra=()
while [ "$#" -gt 0 ]; do
    case $1 in
    --kernel) kernel=$2; shift 2 ;;
    --add) adds+=("$2"); shift 2 ;;
    --run) run_script=$2; shift 2 ;;
    --expect) expects+=("$2"); shift 2 ;;
    --no-builtin) builtin=0; shift ;;
    --timeout) timeout=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --smp) smp=$2; shift 2 ;;
    --qemu) qemu_extra+=("$2"); shift 2 ;;
    --keep) keep=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) kdie "unknown argument $1 (see --help)" ;;
    esac
done
timeout=$((timeout * ${VDEVD_E2E_TIMEOUT_SCALE:-1}))
kneed_root
[ -n "$kernel" ] || kernel=$("$KDIR/build.sh")
[ -s "$kernel" ] || kdie "no kernel at $kernel"
kernel=$(readlink -f "$kernel")

run=$K_SHARE/kernel/$(date +%Y%m%d-%H%M%S).$$
mkdir -p "$run"
qpid=""
stop_qemu() {
    [ -n "$qpid" ] || return 0
    if kill -0 "$qpid" 2>/dev/null; then
        kill -TERM "$qpid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$qpid" 2>/dev/null || true
    fi
    wait "$qpid" 2>/dev/null || true
    qpid=""
}
trap 'stop_qemu' EXIT
trap 'exit 130' INT TERM

# --- the test program: static, built in the trixie root, cached by source hash
bin=""
if [ "$builtin" = 1 ]; then
    h=$(sha256sum <"$KDIR/iommufd_test.c" | cut -c1-16)
    bin=$K_OUT/bin/iommufd_test-$h
    if [ ! -x "$bin" ]; then
        kroot_pkgs gcc libc6-dev linux-libc-dev
        mkdir -p "$K_OUT/bin"
        cp "$KDIR/iommufd_test.c" "$run/iommufd_test.c"
        kroot gcc -O2 -static -Wall -Wextra -Werror -o "$bin.tmp" "$run/iommufd_test.c" ||
            kdie "compiling iommufd_test.c failed"
        mv "$bin.tmp" "$bin"
    fi
fi

# --- the initramfs: busybox (trixie's busybox-static), init, the test, extras
kroot_pkgs busybox-static cpio
tree=$run/initramfs
mkdir -p "$tree"/{bin,sbin,dev,proc,sys,tmp,run,etc,e2e,usr/bin,usr/sbin}
cp "$K_ROOT/usr/bin/busybox" "$tree/bin/busybox"
install -m 0755 "$KDIR/init" "$tree/init"
[ -z "$bin" ] || install -m 0755 "$bin" "$tree/bin/iommufd_test"
[ -z "$run_script" ] || install -m 0755 "$run_script" "$tree/e2e/run.sh"
for a in "${adds[@]}"; do
    src=${a%%:*} dst=${a#*:}
    [ -e "$src" ] || kdie "--add: no file $src"
    mkdir -p "$tree$(dirname "$dst")"
    cp -L "$src" "$tree$dst"
done
kroot sh -c "cd '$tree' && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1 >'$run/initrd'"
rm -rf "$tree"

# --- the guest
cp "$kernel" "$run/bzImage"
# shellcheck disable=SC2054 # the commas are QEMU's, inside single arguments
cmd=(qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot
    -accel tcg -cpu max -smp "$smp" -m "$mem"
    -machine q35,kernel-irqchip=split
    -device intel-iommu,caching-mode=on,intremap=on
    -device edu -device edu
    -kernel "$run/bzImage" -initrd "$run/initrd"
    -append "console=ttyS0 intel_iommu=on panic=-1 loglevel=4"
    -chardev "file,id=con,path=$run/console.log" -serial chardev:con
    -pidfile "$run/qemu.pid"
    "${qemu_extra[@]}")
printf '%q ' "${cmd[@]}" >"$run/cmdline"
echo >>"$run/cmdline"
: >"$run/console.log"
t0=$(know)
"$KDIR/kroot" "${cmd[@]}" >"$run/qemu.log" 2>&1 </dev/null &
qpid=$!
t_init="" outcome=""
deadline=$((${EPOCHREALTIME/./} + timeout * 1000000))
while :; do
    if [ -z "$t_init" ] && grep -q '^E2E-INIT' "$run/console.log"; then
        t_init=$(kelapsed "$t0")
    fi
    if grep -q '^E2E-DONE' "$run/console.log"; then
        outcome=ok
        break
    fi
    if ! kill -0 "$qpid" 2>/dev/null; then
        outcome="QEMU exited before E2E-DONE"
        break
    fi
    if [ "${EPOCHREALTIME/./}" -ge "$deadline" ]; then
        outcome="timed out after $timeout s"
        break
    fi
    sleep 0.1
done
# After E2E-DONE QEMU powers off by itself: give it a moment, then stop it
# (at once on a time-out).
if [ "$outcome" = ok ]; then
    for _ in $(seq 50); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
fi
t_exit=$(kelapsed "$t0")
stop_qemu

# --- the verdict
con=$(tr -d '\r' <"$run/console.log")
want=()
if [ "$builtin" = 1 ]; then
    read -r -d '' -a builtin_checks <<<"$BUILTIN_CHECKS" || true
    want+=("${builtin_checks[@]}")
fi
want+=("${expects[@]}")
npass=0 nfail=0 missing=()
for c in "${want[@]}"; do
    if grep -qx "E2E-PASS $c" <<<"$con"; then npass=$((npass + 1)); else missing+=("$c"); fi
done
fails=$(grep '^E2E-FAIL' <<<"$con" || true)
nfail=$(( ${#missing[@]} ))
[ -z "$fails" ] || nfail=$((nfail + $(grep -c . <<<"$fails")))
[ "$outcome" = ok ] || nfail=$((nfail + 1))
guest_init=$(sed -n 's/^E2E-INIT uptime=\([0-9.]*\).*/\1/p' <<<"$con")
klog "kernel $kernel ($(kstamp_get release 2>/dev/null || true))"
klog "boot to init: ${t_init:-never} s wall (guest uptime ${guest_init:-?} s); run ${t_exit} s; $outcome"
if [ "$outcome" = ok ] && [ "$nfail" = 0 ]; then
    grep -E '^E2E-(PASS|INFO)' <<<"$con" | grep -v '^E2E-INFO dmesg\|^E2E-INFO pci' >&2 || true
    if [ "$keep" = 1 ]; then klog "run directory: $run"; else rm -rf "$run"; fi
    echo "iommufd: $npass passed, 0 failed"
    exit 0
fi
echo "---- console ($run/console.log) ----" >&2
cat "$run/console.log" >&2
echo "---- qemu ($run/qemu.log) ----" >&2
cat "$run/qemu.log" >&2
echo "----" >&2
[ -z "$fails" ] || printf '%s\n' "$fails" >&2
[ "${#missing[@]}" = 0 ] || klog "no E2E-PASS for: ${missing[*]}"
[ "$outcome" = ok ] || klog "FAIL: $outcome"
klog "run directory kept: $run"
echo "iommufd: $npass passed, $nfail failed"
exit 1
