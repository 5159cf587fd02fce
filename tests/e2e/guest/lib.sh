# shellcheck shell=sh
# Guest-side helpers (busybox sh). Sourced by /init.
#
# Results go to the host as marker lines on the second serial port
# (/dev/ttyS1, nothing else writes there) and are echoed on the console
# (/dev/ttyS0) so that the console log reads as a story:
#   E2E-BEGIN <suite> <phase> ...    the guest's init is running
#   E2E-RUN <check>                  a check starts
#   E2E-PASS <check>                 it passed
#   E2E-FAIL <check> <reason>        it failed (its log follows on the console)
#   E2E-INFO <key> <value...>        a measurement or a value for the host
#   E2E-MARK <name>                  a point the host may wait for
#   E2E-DONE pass=<n> fail=<n>       the phase ran to its end

E2E_TTY=/dev/ttyS1
E2E_STATE=/tmp/e2e-state
mkdir -p "$E2E_STATE"

# busybox-static's shell runs its own applets before anything in PATH, so a
# real tool the image carries (util-linux's blkdiscard, e2fsprogs' mke2fs, ...)
# is wrapped in a function of the same name, which the shell looks up first.
_applets=" $(busybox --list | tr '\n' ' ') "
for _f in /usr/sbin/* /usr/bin/*; do
    if [ ! -f "$_f" ] || [ -L "$_f" ]; then continue; fi
    _b=${_f##*/}
    case "$_b" in *[!a-zA-Z0-9_]* | busybox) continue ;; esac
    case "$_applets" in *" $_b "*) eval "$_b() { $_f \"\$@\"; }" ;; esac
done
unset _applets _f _b

# Keep loops out of a check's trace.
_trace_off() { case $- in *x*) set +x; _trace=1 ;; *) _trace=0 ;; esac; }
_trace_on() { if [ "$_trace" = 1 ]; then set -x; fi; }

e2e_emit() {
    printf '%s\n' "$*" >"$E2E_TTY"
    printf '%s\n' "$*"
}
pass() { e2e_emit "E2E-PASS $1"; echo "$1" >>"$E2E_STATE/pass"; }
fail() {
    _n=$1
    shift
    e2e_emit "E2E-FAIL $_n $*"
    echo "$_n" >>"$E2E_STATE/fail"
}
info() { e2e_emit "E2E-INFO $*"; }
mark() { e2e_emit "E2E-MARK $1"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
count() { if [ -f "$E2E_STATE/$1" ]; then wc -l <"$E2E_STATE/$1"; else echo 0; fi; }

# die REASON: end the current check with REASON (inside a check only).
die() {
    printf '%s\n' "$*" >"$E2E_STATE/reason"
    echo "check failed: $*" >&2
    exit 1
}

# check NAME FUNCTION [ARG...]: run FUNCTION in a subshell with `set -e` and
# a trace, its output in /tmp/check-NAME.log. It passes if it returns 0; else
# the reason given to die (or the failing command's status) is reported and
# the log's tail is shown on the console. A check that runs longer than
# E2E_CHECK_TIMEOUT seconds (default 300) is killed and fails as timed out,
# with its log, so a hang names itself before the host's own timeout.
check() {
    _name=$1
    shift
    rm -f "$E2E_STATE/reason" "$E2E_STATE/timedout"
    e2e_emit "E2E-RUN $_name"
    _t0=$(uptime_s)
    (
        set -e
        set -x
        "$@"
    ) >"/tmp/check-$_name.log" 2>&1 &
    _cpid=$!
    (
        sleep "${E2E_CHECK_TIMEOUT:-300}"
        echo "${E2E_CHECK_TIMEOUT:-300}" >"$E2E_STATE/timedout"
        kill -KILL "$_cpid"
    ) 2>/dev/null &
    _wpid=$!
    wait "$_cpid"
    _rc=$?
    kill "$_wpid" 2>/dev/null
    if [ -e "$E2E_STATE/timedout" ]; then
        echo "check $_name timed out after $(cat "$E2E_STATE/timedout") s" >"$E2E_STATE/reason"
        _rc=124
    fi
    if [ "$_rc" = 0 ]; then
        pass "$_name"
        info "time $_name $_t0 $(uptime_s)"
        return 0
    fi
    if [ -s "$E2E_STATE/reason" ]; then
        fail "$_name" "$(cat "$E2E_STATE/reason")"
    else
        fail "$_name" "a command failed (exit status $_rc); see the log above"
    fi
    echo "---- last lines of /tmp/check-$_name.log"
    tail -n 60 "/tmp/check-$_name.log" | sed "s/^/$_name| /"
    echo "----"
    return 1
}

# Block pattern shared with the host (lib/pattern.sh writes the same bytes):
# block I of TAG is the text "vdevd-e2e TAG block I", space-padded to BS-1
# bytes and ended by a newline.
# pattern TAG FIRST COUNT BS: write COUNT blocks starting with block FIRST.
pattern() {
    _trace_off
    _i=$2
    _end=$(($2 + $3))
    _w=$(($4 - 1))
    while [ "$_i" -lt "$_end" ]; do
        printf "%-${_w}s\n" "vdevd-e2e $1 block $_i"
        _i=$((_i + 1))
    done
    _trace_on
}

# wait_for SECONDS CMD...: poll CMD every 0.1 s until it succeeds.
wait_for() {
    _trace_off
    _n=$(($1 * 10))
    shift
    while [ "$_n" -gt 0 ]; do
        if "$@"; then
            _trace_on
            return 0
        fi
        sleep 0.1
        _n=$((_n - 1))
    done
    _trace_on
    return 1
}

# --- block device checks shared by nvme.sh and virtio-blk.sh. They use DEV
# (the device node), BYTES (its size), LBS (its logical block size),
# SCRATCH (an offset the script may overwrite), E2E_SEED, and for messages
# BLK_UNIT ("LBA", "sector") and BLK_WHAT ("namespace", "disk").

# First and last block written and read back with O_DIRECT; a read past
# the end returns nothing.
check_lba_edges() {
    last=$((BYTES / LBS - 1))
    pattern "edge-$E2E_SEED" 0 1 "$LBS" >/tmp/first.bin
    pattern "edge-$E2E_SEED" "$last" 1 "$LBS" >/tmp/last.bin
    dd if=/tmp/first.bin of="$DEV" bs="$LBS" seek=0 oflag=direct conv=notrunc
    dd if=/tmp/last.bin of="$DEV" bs="$LBS" seek="$last" oflag=direct conv=notrunc
    dd if="$DEV" bs="$LBS" skip=0 count=1 iflag=direct | cmp - /tmp/first.bin ||
        die "$BLK_UNIT 0 does not read back what was written"
    dd if="$DEV" bs="$LBS" skip="$last" count=1 iflag=direct | cmp - /tmp/last.bin ||
        die "last $BLK_UNIT $last does not read back what was written"
    if dd if="$DEV" bs="$LBS" skip=$((last + 1)) count=1 iflag=direct 2>/dev/null | grep -q .; then
        die "a read past the last $BLK_UNIT returned data"
    fi
}

# Every 4 KiB carries a header with its own offset and a checksum, so a
# misdirected, torn or dropped write is caught when fio reads it all back.
check_pattern() {
    fio --name=pattern --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=8 \
        --rw=write --bs=128k --size="$BYTES" --randseed="$E2E_SEED" \
        --verify=crc32c --verify_interval=4096 --do_verify=1 --verify_fatal=1 \
        --output=/tmp/fio-pattern.txt || {
        cat /tmp/fio-pattern.txt
        die "fio pattern write/verify over the whole $BLK_WHAT failed"
    }
    grep -E 'WRITE:|READ:' /tmp/fio-pattern.txt
}

# 1 MiB of pattern at SCRATCH, its first half discarded: the second half
# must be untouched. Leaves the pattern in /tmp/scratch.bin.
discard_keeps_neighbours() {
    pattern "scratch-$E2E_SEED" 0 256 4096 >/tmp/scratch.bin
    write_file_at /tmp/scratch.bin "$SCRATCH"
    blkdiscard -v -o "$SCRATCH" -l $((512 * 1024)) "$DEV" || die "blkdiscard of 512 KiB at $SCRATCH failed"
    expect_range $((SCRATCH + 512 * 1024)) $((512 * 1024)) /tmp/scratch.bin $((512 * 1024)) ||
        die "discard changed data outside the discarded range"
}

# --- helpers and checks the NVMe and virtio-blk scripts share; DEV, SCRATCH,
# TAIL, MiB, FS_MNT and the device-specific helpers come from those scripts.

drop_caches() { sync && echo 3 >/proc/sys/vm/drop_caches; }

# read_range OFF LEN: the bytes at OFF (O_DIRECT, 4 KiB units) on stdout.
read_range() { dd if="$DEV" bs=4096 skip=$(($1 / 4096)) count=$(($2 / 4096)) iflag=direct 2>/dev/null; }

# write_file_at FILE OFF: write FILE at byte OFF (O_DIRECT, 4 KiB units).
write_file_at() { dd if="$1" of="$DEV" bs=4096 seek=$(($2 / 4096)) oflag=direct conv=notrunc 2>/dev/null; }

# expect_range OFF LEN FILE [FOFF]: the device's LEN bytes at OFF equal FILE's at FOFF.
expect_range() { read_range "$1" "$2" | cmp -n "$2" - "$3" 0 "${4:-0}"; }

is_zero() { # is_zero OFF LEN
    [ "$(read_range "$1" "$2" | sha256sum | cut -d' ' -f1)" = "$(head -c "$2" /dev/zero | sha256sum | cut -d' ' -f1)" ]
}

# write_files DIR TAG: files of assorted sizes with random content, and their
# checksums appended to DIR/MANIFEST.
write_files() {
    for kib in 4 12 64 1024 3072; do
        f=$2-$kib.bin
        dd if=/dev/urandom of="$1/$f" bs=1024 count="$kib" 2>/dev/null
        (cd "$1" && sha256sum "$f") >>"$1/MANIFEST"
    done
}

verify_files() { # verify_files DIR: every file in MANIFEST reads back intact
    drop_caches
    (cd "$1" && sha256sum -c MANIFEST) || die "file contents differ from MANIFEST in $1"
}

fsck_clean() {
    e2fsck -f -n "$DEV" || die "e2fsck -f -n reports problems (exit status $?)"
}

check_ext4() {
    blocks=$((SCRATCH / 4096))
    mkfs.ext4 -q -F -b 4096 -L vdevd-e2e "$DEV" "$blocks" || die "mkfs.ext4 failed"
    mkdir -p "$FS_MNT"
    mount -t ext4 "$DEV" "$FS_MNT" || die "mount of the new ext4 failed"
    write_files "$FS_MNT" a
    sync
    umount "$FS_MNT" || die "umount failed"
    fsck_clean
    mount -t ext4 "$DEV" "$FS_MNT" || die "remount failed"
    verify_files "$FS_MNT"
    fstrim -v "$FS_MNT" || die "fstrim on the mounted ext4 failed"
    verify_files "$FS_MNT"
    umount "$FS_MNT"
}

# The state the host checks after power-off: the host-known tail pattern
# and a hash of the whole namespace as the guest reads it (O_DIRECT).
# shellcheck disable=SC2154 # MiB and TAIL come from the device script
check_final_state() {
    pattern "tail-$E2E_SEED" $((TAIL / 4096)) 256 4096 >/tmp/tail.bin
    write_file_at /tmp/tail.bin "$TAIL"
    sync
    expect_range "$TAIL" "$MiB" /tmp/tail.bin || die "the tail pattern does not read back"
    sum=$(dd if="$DEV" bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    info "device-sha256 $sum"
}

# A new VM after the kill: what was flushed before it is there, and the file
# system is consistent once its journal is replayed.
check_recover() {
    mount -t ext4 "$DEV" "$FS_MNT" || die "mount after the kill failed"
    (cd "$FS_MNT" && sha256sum -c flushed.sha256) || die "data flushed before the kill is not intact"
    verify_files "$FS_MNT"
    umount "$FS_MNT"
    fsck_clean
}
