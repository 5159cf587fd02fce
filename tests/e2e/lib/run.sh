# shellcheck shell=bash
# The run library: processes of one suite run (vdevd on the host, QEMU in the
# trixie root), guest boots, markers, timeouts, cleanup and diagnostics.
# Sourced after common.sh and image.sh, by `run` and `bench`, once per suite
# run, inside a subshell of its own (the EXIT trap belongs to the suite).
#
# Every process a run starts is recorded by name with its pid and stopped by
# that pid on every exit path (the EXIT trap): never by process name.
#
# Files of a run, under $E2E_RUN_DIR ($E2E_SHARE/e2e/<suite>.<time>.<pid>):
#   vdevd-<name>.log              vdevd's stderr/stdout
#   vm-<name>/console.log         the guest's console (ttyS0)
#   vm-<name>/markers.log         the guest's result lines (ttyS1)
#   vm-<name>/qemu.log            QEMU's stderr (and traces, if asked for)
#   vm-<name>/cmdline             the QEMU command line
# The directory is removed after a passing run unless VDEVD_E2E_KEEP=1.

: "${VDEVD_E2E_TIMEOUT_SCALE:=1}"  # multiply every timeout (slow machines)
: "${VDEVD_E2E_ACCEL:=auto}"       # tcg, kvm, or auto (KVM only if a probe boots)
: "${VDEVD_E2E_RUST_LOG:=info}"    # RUST_LOG for vdevd
: "${VDEVD_E2E_QEMU_TRACE:=}"      # e.g. 'vfio_user_*' to trace QEMU's client
: "${VDEVD_E2E_KEEP:=0}"
: "${VDEVD_E2E_VERBOSE:=0}"        # 1: echo guest result lines as they arrive

declare -A E2E_PID=() E2E_PPID=() E2E_STATUS=() E2E_KIND=() E2E_LOG=()
E2E_NAMES=()
E2E_FAILURES=()
E2E_SUITE_NAME=
E2E_RUN_DIR=

e2e_say() { printf 'e2e[%s]: %s\n' "$E2E_SUITE_NAME" "$*" >&2; }
e2e_fail() {
    E2E_FAILURES+=("$*")
    e2e_say "${E2E_FAIL_LABEL:-FAIL}: $*"
}
e2e_host_pass() { e2e_say "PASS (host) $*"; }
e2e_timeout() { echo $(($1 * VDEVD_E2E_TIMEOUT_SCALE)); }

# --- run lifecycle ----------------------------------------------------------------
e2e_run_begin() {
    E2E_SUITE_NAME=$1
    E2E_RUN_DIR=$E2E_SHARE/e2e/$1.$(date +%Y%m%d-%H%M%S).$BASHPID
    mkdir -p "$E2E_RUN_DIR"
    trap 'e2e_cleanup' EXIT
    trap 'e2e_fail "interrupted by a signal"; exit 130' INT TERM HUP
    e2e_say "run directory $E2E_RUN_DIR"
}

# e2e_run_end: stop what is left, print diagnostics on failure, return the
# suite's status (0 only if nothing failed).
e2e_run_end() {
    e2e_stop_all
    E2E_CLEANUP_REPORTED=1
    if [ "${#E2E_FAILURES[@]}" -gt 0 ]; then
        e2e_diagnostics
        e2e_say "suite FAILED (${#E2E_FAILURES[@]} failure(s)); logs kept in $E2E_RUN_DIR"
        printf '  - %s\n' "${E2E_FAILURES[@]}" >&2
        return 1
    fi
    if [ "$VDEVD_E2E_KEEP" = 1 ]; then
        e2e_say "logs kept in $E2E_RUN_DIR"
    else
        rm -rf "$E2E_RUN_DIR"
    fi
    return 0
}

e2e_cleanup() {
    local rc=$?
    e2e_stop_all
    if [ "$rc" != 0 ] && [ "${E2E_CLEANUP_REPORTED:-0}" = 0 ]; then
        E2E_CLEANUP_REPORTED=1
        [ "${#E2E_FAILURES[@]}" -gt 0 ] || E2E_FAILURES+=("the suite script exited with status $rc")
        e2e_diagnostics
        e2e_say "suite FAILED; logs kept in $E2E_RUN_DIR"
    fi
}

# Print what a person needs to see why a run failed: each guest's console,
# QEMU's stderr, and each vdevd log.
e2e_diagnostics() {
    local n lines=${VDEVD_E2E_LOG_LINES:-300}
    for n in "${E2E_NAMES[@]}"; do
        case "${E2E_KIND[$n]}" in
            vm)
                e2e_dump "guest console of '$n'" "${E2E_LOG[$n]}/console.log" "$lines"
                e2e_dump "QEMU stderr of '$n'" "${E2E_LOG[$n]}/qemu.log" "$lines"
                ;;
            vdevd) e2e_dump "vdevd log of '$n'" "${E2E_LOG[$n]}" "$lines" ;;
        esac
    done
}
e2e_dump() { # e2e_dump TITLE FILE MAXLINES
    local total
    [ -e "$2" ] || { printf '==== %s: (no file %s)\n' "$1" "$2" >&2; return 0; }
    total=$(wc -l <"$2")
    if [ "$total" -gt "$3" ]; then
        printf '==== %s (%s), last %s of %s lines:\n' "$1" "$2" "$3" "$total" >&2
    else
        printf '==== %s (%s):\n' "$1" "$2" >&2
    fi
    tail -n "$3" "$2" | tr -d '\r' >&2
    printf '==== end of %s\n' "$1" >&2
}

# --- processes --------------------------------------------------------------------
# e2e_is_alive NAME: the recorded process exists, is not a zombie, and is
# still the child of the shell that started it (so a recycled pid is never
# mistaken for it).
e2e_is_alive() {
    local pid=${E2E_PID[$1]:-} stat state ppid
    [ -n "$pid" ] || return 1
    read -r stat 2>/dev/null <"/proc/$pid/stat" || return 1
    read -r state ppid _ <<<"${stat##*) }"
    [ "$state" != Z ] && [ "$ppid" = "${E2E_PPID[$1]}" ]
}

# e2e_spawn NAME KIND LOG CMD...: start CMD in the background, output to LOG.
# NAME must be new in this run: it is the key the pid is recorded under.
e2e_spawn() {
    local name=$1 kind=$2 log=$3 n
    shift 3
    for n in "${E2E_NAMES[@]}"; do
        [ "$n" != "$name" ] || e2e_die "harness bug: process name '$name' used twice in one run"
    done
    "$@" >"$log" 2>&1 </dev/null &
    E2E_PID[$name]=$!
    E2E_PPID[$name]=$BASHPID
    E2E_KIND[$name]=$kind
    E2E_NAMES+=("$name")
    echo "${E2E_PID[$name]} $name $*" >>"$E2E_RUN_DIR/pids"
}

# e2e_stop NAME SIGNAL GRACE: send SIGNAL, wait up to GRACE s, then SIGKILL.
# Records the exit status in E2E_STATUS[NAME]; returns 1 if SIGKILL was needed.
e2e_stop() {
    local name=$1 sig=$2 grace=$3 pid=${E2E_PID[$1]:-} n forced=0 e2e_stderr
    [ -n "$pid" ] || return 0
    # bash reports a background job killed by a signal ("... Killed") on
    # stderr when it reaps it; here that is the intended outcome, not news.
    exec {e2e_stderr}>&2 2>/dev/null
    if e2e_is_alive "$name"; then
        kill "-$sig" "$pid" 2>/dev/null || true
        n=$((grace * 10))
        while [ "$n" -gt 0 ] && e2e_is_alive "$name"; do
            sleep 0.1
            n=$((n - 1))
        done
        if e2e_is_alive "$name"; then
            kill -KILL "$pid" 2>/dev/null || true
            forced=1
        fi
    fi
    wait "$pid" 2>/dev/null
    E2E_STATUS[$name]=$?
    exec 2>&"$e2e_stderr" {e2e_stderr}>&-
    unset "E2E_PID[$name]"
    [ "$forced" = 0 ]
}

e2e_stop_all() {
    local n
    for n in "${E2E_NAMES[@]}"; do
        [ -n "${E2E_PID[$n]:-}" ] || continue
        case "${E2E_KIND[$n]}" in
            vm) e2e_stop "$n" KILL 5 || true ;;
            *) e2e_stop "$n" TERM 10 || true ;;
        esac
    done
}

# --- vdevd ------------------------------------------------------------------------
# e2e_vdevd_binary: build vdevd with the workspace's one profile (unless
# VDEVD_E2E_VDEVD names a binary) and print its path.
e2e_vdevd_binary() {
    if [ -n "${VDEVD_E2E_VDEVD:-}" ]; then
        [ -x "$VDEVD_E2E_VDEVD" ] || e2e_die "VDEVD_E2E_VDEVD=$VDEVD_E2E_VDEVD is not executable"
        printf '%s\n' "$VDEVD_E2E_VDEVD"
        return 0
    fi
    local target=${CARGO_TARGET_DIR:-$E2E_REPO/target}
    if [ "${E2E_VDEVD_BUILT:-0}" != 1 ]; then
        command -v cargo >/dev/null || e2e_die "cargo not found: cannot build vdevd (or set VDEVD_E2E_VDEVD)"
        e2e_log "building vdevd (cargo build -p vdevd)"
        (cd "$E2E_REPO" && timeout 3600 cargo build -q -p vdevd) >&2 || e2e_die "cargo build -p vdevd failed"
        E2E_VDEVD_BUILT=1
        export E2E_VDEVD_BUILT
    fi
    [ -x "$target/debug/vdevd" ] || e2e_die "no vdevd binary at $target/debug/vdevd"
    printf '%s\n' "$target/debug/vdevd"
}

# e2e_unix_listening PATH: a socket bound to PATH is listening, in this
# network namespace (/proc/net/unix: Flags 00010000 is __SO_ACCEPTCON). A
# leftover socket file that nobody listens on does not count.
e2e_unix_listening() {
    awk -v p="$1" '$NF == p && $4 == "00010000" { found = 1 } END { exit !found }' /proc/net/unix
}

# e2e_vdevd_start NAME SOCKET ARG...: run `vdevd ARG...` on the host, log in
# vdevd-NAME.log, and wait until it listens on SOCKET. Fails the run (and
# returns 1) if vdevd exits first or does not listen in time. A socket file
# left by an earlier server on the same path is left alone: replacing it is
# the server's job.
e2e_vdevd_start() {
    local name=$1 sock=$2 bin log n
    shift 2
    bin=$(e2e_vdevd_binary) || return 1
    log=$E2E_RUN_DIR/vdevd-$name.log
    [ "${#sock}" -lt 108 ] || { e2e_fail "socket path too long for AF_UNIX (${#sock} bytes): $sock"; return 1; }
    e2e_spawn "$name" vdevd "$log" env RUST_LOG="$VDEVD_E2E_RUST_LOG" RUST_BACKTRACE=1 "$bin" "$@"
    E2E_LOG[$name]=$log
    e2e_say "vdevd '$name' (pid ${E2E_PID[$name]}): $bin $*"
    n=$(($(e2e_timeout 30) * 10))
    while [ "$n" -gt 0 ]; do
        if ! e2e_is_alive "$name"; then
            e2e_stop "$name" TERM 1 || true
            e2e_fail "vdevd '$name' exited with status ${E2E_STATUS[$name]} before listening on $sock"
            return 1
        fi
        e2e_unix_listening "$sock" && return 0
        sleep 0.1
        n=$((n - 1))
    done
    e2e_fail "vdevd '$name' did not listen on $sock within $(e2e_timeout 30) s"
    return 1
}

# e2e_vdevd_stop NAME: SIGTERM and wait for exit (it must exit on its own).
e2e_vdevd_stop() {
    local name=$1 grace
    grace=$(e2e_timeout 15)
    if ! e2e_is_alive "$name"; then
        e2e_stop "$name" TERM 1 || true
        e2e_fail "vdevd '$name' had already exited (status ${E2E_STATUS[$name]:-?}) when asked to stop"
        return 1
    fi
    if ! e2e_stop "$name" TERM "$grace"; then
        e2e_fail "vdevd '$name' did not exit within $grace s of SIGTERM (killed)"
        return 1
    fi
    e2e_say "vdevd '$name' exited with status ${E2E_STATUS[$name]} after SIGTERM"
}

# --- accelerator ----------------------------------------------------------------------
# TCG unless KVM can boot the guest kernel: /dev/kvm may be there and still
# unable to run Linux (a PVM host). The probe's answer is cached per host
# kernel, CPU, QEMU and guest kernel.
e2e_accel() {
    case "$VDEVD_E2E_ACCEL" in
        tcg | kvm) echo "$VDEVD_E2E_ACCEL"; return 0 ;;
        auto) ;;
        *) e2e_die "VDEVD_E2E_ACCEL must be tcg, kvm or auto" ;;
    esac
    [ -w /dev/kvm ] || { echo tcg; return 0; }
    local key file
    key=$({
        uname -r
        grep -m1 'model name' /proc/cpuinfo
        chroot "$E2E_ROOT" dpkg-query -W -f='${Version}' "$E2E_QEMU_PKG"
        e2e_kernel_version
    } | sha256sum | cut -c1-16)
    file=$VDEVD_E2E_CACHE/accel-probe-$key
    if [ ! -s "$file" ]; then
        e2e_log "probing whether KVM boots the guest (once per host; result in $file)"
        local result=tcg
        if (e2e_probe_kvm "$file"); then result=kvm; fi
        e2e_log "KVM probe: guests will run with $result (console: $file.console)"
        echo "$result" >"$file"
    fi
    cat "$file"
}
e2e_probe_kvm() { # runs in a subshell of its own
    E2E_FAILURES=()
    E2E_NAMES=()
    e2e_run_begin kvm-probe
    VDEVD_E2E_ACCEL=kvm
    # shellcheck disable=SC2034 # read by e2e_fail
    E2E_FAIL_LABEL="KVM cannot boot the guest"
    if e2e_vm_start probe hello.sh hello "" min 256 --; then
        e2e_vm_wait probe 30
        e2e_vm_expect probe hello
    fi
    e2e_stop_all
    cat "${E2E_LOG[probe]}/console.log" "${E2E_LOG[probe]}/qemu.log" >"$1.console" 2>/dev/null
    local n=${#E2E_FAILURES[@]}
    E2E_FAILURES=()
    E2E_CLEANUP_REPORTED=1
    rm -rf "$E2E_RUN_DIR"
    [ "$n" = 0 ]
}

# --- guests ----------------------------------------------------------------------------
# e2e_vm_start NAME SCRIPT PHASE MODULES PROFILE MEM_MB [KEY=VALUE...] -- [QEMU_ARG...]
# Boots the guest kernel with /init running phase PHASE of guest/SCRIPT,
# after `modprobe` of MODULES; KEY=VALUE pairs land in /e2e/config.
# Extra files for the guest: E2E_VM_FILES="src:dst ..." (copied into the overlay).
# Another kernel than Debian's: E2E_VM_KERNEL=/path/to/bzImage.
e2e_vm_start() {
    local name=$1 script=$2 phase=$3 modules=$4 profile=$5 mem=$6 dir base kernel accel kv
    shift 6
    dir=$E2E_RUN_DIR/vm-$name
    rm -rf "$dir"
    mkdir -p "$dir/overlay/e2e"
    E2E_LOG[$name]=$dir
    base=$(e2e_base_image "$profile") || return 1
    # E2E_VM_KERNEL: another guest kernel (e.g. tests/e2e/kernel's iommufd one).
    kernel=${E2E_VM_KERNEL:-}
    [ -n "$kernel" ] || kernel=$(e2e_kernel_image) || e2e_die "no guest kernel (run tests/e2e/provision)"
    install -m 0755 "$E2E_DIR/guest/init" "$dir/overlay/init"
    cp "$E2E_DIR/guest/lib.sh" "$E2E_DIR/guest/$script" "$dir/overlay/e2e/"
    {
        e2e_kv E2E_SUITE "$E2E_SUITE_NAME"
        e2e_kv E2E_PHASE "$phase"
        e2e_kv E2E_SCRIPT "$script"
        e2e_kv E2E_MODULES "$modules"
        while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
            kv=$1
            shift
            e2e_kv "${kv%%=*}" "${kv#*=}"
        done
    } >"$dir/overlay/e2e/config"
    [ "${1:-}" = -- ] && shift
    local f
    for f in ${E2E_VM_FILES:-}; do
        mkdir -p "$dir/overlay$(dirname "${f#*:}")"
        cp -L "${f%%:*}" "$dir/overlay${f#*:}"
    done
    e2e_make_initrd "$dir/initrd" "$base" "$dir/overlay"
    accel=$(e2e_accel)
    # shellcheck disable=SC2054 # commas belong to QEMU's option syntax
    local -a cmd=(qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot
        -accel "$accel" -cpu "${VDEVD_E2E_CPU:-max}" -smp "${VDEVD_E2E_SMP:-1}" -m "${mem}M"
        -machine q35,memory-backend=mem
        -object "memory-backend-memfd,id=mem,size=${mem}M,share=on"
        -kernel "$kernel" -initrd "$dir/initrd"
        -append "console=ttyS0 quiet panic=-1 nvme_core.multipath=N ${E2E_VM_APPEND:-}"
        -chardev "file,id=con,path=$dir/console.log" -serial chardev:con
        -chardev "file,id=mark,path=$dir/markers.log" -serial chardev:mark
        -pidfile "$dir/qemu.pid")
    [ -n "$VDEVD_E2E_QEMU_TRACE" ] && cmd+=(-trace "$VDEVD_E2E_QEMU_TRACE")
    cmd+=("$@")
    printf '%q ' "${cmd[@]}" >"$dir/cmdline"
    echo >>"$dir/cmdline"
    : >"$dir/markers.log"
    E2E_VM_T0[$name]=$(e2e_now)
    e2e_spawn "$name" vm "$dir/qemu.log" "$E2E_DIR/lib/chroot-run" "${cmd[@]}"
    e2e_say "guest '$name' (QEMU pid ${E2E_PID[$name]}, $accel): $script phase $phase"
}
declare -A E2E_VM_T0=()

# e2e_vfio_user_device SOCKET SLOT: the -device JSON of QEMU's vfio-user
# client for a server on SOCKET, at SLOT (e.g. 0x4) of the root bus. Extra
# properties: VDEVD_E2E_VFIO_USER_PROPS, e.g. '"x-msg-timeout":20000'.
e2e_vfio_user_device() {
    printf '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"%s"},"bus":"pcie.0","addr":"%s"%s}\n' \
        "$1" "$2" "${VDEVD_E2E_VFIO_USER_PROPS:+,$VDEVD_E2E_VFIO_USER_PROPS}"
}

e2e_kv() { # e2e_kv KEY VALUE: a line of /e2e/config, single-quoted for sh
    printf "%s='%s'\n" "$1" "${2//\'/\'\\\'\'}"
}

e2e_markers() { tr -d '\r' <"${E2E_LOG[$1]}/markers.log" 2>/dev/null; }

# e2e_vm_wait_for NAME REGEX TIMEOUT: wait until a marker line matches REGEX.
# Returns 1 (without failing the run) if QEMU exits or the time runs out.
e2e_vm_wait_for() {
    local name=$1 re=$2 n
    n=$(($(e2e_timeout "$3") * 5))
    while [ "$n" -gt 0 ]; do
        e2e_markers "$name" | grep -Eq -- "$re" && return 0
        e2e_is_alive "$name" || { e2e_markers "$name" | grep -Eq -- "$re"; return; }
        sleep 0.2
        n=$((n - 1))
    done
    return 1
}

# e2e_vm_wait NAME TIMEOUT: wait for the phase to finish (E2E-DONE) and QEMU
# to exit after the guest's power-off. A timeout, a guest that stops without
# E2E-DONE (panic, QEMU error) or a QEMU that does not exit fails the run.
e2e_vm_wait() {
    local name=$1 t=$2 last
    if ! e2e_vm_wait_for "$name" '^E2E-DONE' "$t"; then
        if e2e_is_alive "$name"; then
            last=$(e2e_markers "$name" | grep '^E2E-RUN' | tail -n 1)
            e2e_fail "guest '$name' timed out after $(e2e_timeout "$t") s (last started: ${last:-no check started})"
        else
            e2e_stop "$name" KILL 1 || true
            e2e_fail "guest '$name' stopped without finishing (QEMU exit status ${E2E_STATUS[$name]}): see its console"
        fi
        e2e_stop "$name" KILL 1 || true
        return 1
    fi
    if ! e2e_stop_wait "$name" "$(e2e_timeout 30)"; then
        e2e_fail "QEMU of '$name' did not exit within $(e2e_timeout 30) s of the guest's power-off (killed)"
        return 1
    fi
    [ "${E2E_STATUS[$name]}" = 0 ] || { e2e_fail "QEMU of '$name' exited with status ${E2E_STATUS[$name]}"; return 1; }
    e2e_say "guest '$name' done in $(e2e_elapsed "${E2E_VM_T0[$name]}") s: $(e2e_markers "$name" | grep '^E2E-DONE')"
}
# e2e_stop_wait NAME SECONDS: wait for the process to exit on its own, then KILL.
e2e_stop_wait() {
    local n=$(($2 * 10))
    while [ "$n" -gt 0 ] && e2e_is_alive "$1"; do
        sleep 0.1
        n=$((n - 1))
    done
    e2e_stop "$1" KILL 1
}

# e2e_vm_kill NAME: SIGKILL QEMU (a crash, as far as the device server knows).
e2e_vm_kill() { e2e_stop "$1" KILL 1 || true; }

# e2e_vm_expect NAME CHECK...: every CHECK reported E2E-PASS, and no check
# reported E2E-FAIL (a check that did not run at all is a failure too).
e2e_vm_expect() {
    local name=$1 c m
    shift
    m=$(e2e_markers "$name")
    while read -r c; do
        [ -n "$c" ] && e2e_fail "guest '$name': ${c#E2E-FAIL }"
    done < <(grep '^E2E-FAIL' <<<"$m")
    for c in "$@"; do
        if grep -qx "E2E-PASS $c" <<<"$m"; then
            [ "$VDEVD_E2E_VERBOSE" = 1 ] && e2e_say "PASS $name/$c"
        elif ! grep -q "^E2E-FAIL $c " <<<"$m"; then
            e2e_fail "guest '$name': check '$c' did not run"
        fi
    done
}

# e2e_vm_info NAME KEY: the value of the last `E2E-INFO KEY value` line.
e2e_vm_info() {
    e2e_markers "$1" | sed -n "s/^E2E-INFO $2 //p" | tail -n 1
}
