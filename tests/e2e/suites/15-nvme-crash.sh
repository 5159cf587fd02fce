# shellcheck shell=bash
# nvme-crash: the device server killed (SIGKILL) while the guest writes.
#   write    `vdevd nvme --image FILE`; the guest makes an ext4, then writes
#            files one by one, each fsync'ed and synced before it reports it
#            as flushed, with direct reads in flight. After a few files the
#            host kills vdevd with SIGKILL, then QEMU (its device is gone).
#   recover  vdevd started again on the same image and socket (the old
#            socket file is still there); a new guest finds every file
#            reported flushed before the kill with its content, and the file
#            system is fsck-clean after mount replayed its journal.
# selftest-nvme-crash: the same check list fails on a controller whose
#   flushed writes never reach the file (QEMU's nvme on a snapshot=on drive,
#   killed the same way).
# Uses VDEVD_E2E_NVME_MB and VDEVD_E2E_NVME_ARGS (suites/10-nvme.sh).
E2E_SUITES+=(nvme-crash selftest-nvme-crash)

# nvme_crash_flushed VM: the files guest VM reported flushed, as
# "NAME:SHA256 ..." for E2E_FLUSHED.
nvme_crash_flushed() {
    e2e_markers "$1" | sed -En 's/^E2E-INFO flushed-file (w-[0-9]+\.bin) ([0-9a-f]{64})$/\1:\2/p' | tr '\n' ' '
}

suite_nvme_crash() {
    local img sock seed size mods="nvme ext4" flushed n
    local -a dev
    img=$E2E_RUN_DIR/nvme.img
    sock=$E2E_RUN_DIR/nvme.sock
    seed=$RANDOM$RANDOM
    size=$((VDEVD_E2E_NVME_MB * 1048576))
    truncate -s "$size" "$img"
    mapfile -t dev < <(nvme_device_args vdevd "$img" "$sock")
    local -a cfg=(E2E_NVME_BDF="$E2E_NVME_BDF" E2E_EXPECT_BYTES="$size" E2E_SEED="$seed")

    # 1. write, and kill the server under the guest
    nvme_backend_start vdevd vdevd-1 "$img" "$sock" || return
    e2e_vm_start write nvme.sh srvkill "$mods" blk 512 "${cfg[@]}" -- "${dev[@]}" || return
    if e2e_vm_wait_for write '^E2E-MARK busy' 300; then
        sleep 2
        e2e_stop vdevd-1 KILL 5 || true
        if [ "${E2E_STATUS[vdevd-1]}" = 137 ]; then
            e2e_host_pass "vdevd killed (SIGKILL) with guest writes in flight"
        else
            e2e_fail "vdevd had exited with status ${E2E_STATUS[vdevd-1]} before it was killed"
        fi
    else
        e2e_fail "guest 'write' never reported three flushed files"
        e2e_stop vdevd-1 KILL 5 || true
    fi
    # What the guest reported before the kill is in its marker log now; let
    # a line in transit land, then stop QEMU.
    sleep 1
    e2e_vm_kill write
    e2e_vm_expect write bind setup
    flushed=$(nvme_crash_flushed write)
    n=$(wc -w <<<"$flushed")
    [ "$n" -ge 3 ] || { e2e_fail "only $n files reported flushed before the kill"; return; }
    e2e_say "$n files reported flushed before the kill"

    # 2. recover: the same image and socket, a new server and guest
    nvme_backend_start vdevd vdevd-2 "$img" "$sock" || return
    e2e_vm_start recover nvme.sh srvkill_recover "$mods" blk 512 "${cfg[@]}" E2E_FLUSHED="$flushed" -- "${dev[@]}" || return
    e2e_vm_wait recover 600
    e2e_vm_expect recover bind recover
    if [ "$(e2e_vm_info recover flushed-verified)" = "$n" ]; then
        e2e_host_pass "all $n files flushed before the kill read back intact"
    else
        e2e_fail "guest 'recover' verified $(e2e_vm_info recover flushed-verified) of $n flushed files"
    fi
    nvme_backend_stop vdevd vdevd-2
}

suite_selftest_nvme_crash() {
    selftest_provoking
    local img=$E2E_RUN_DIR/nvme.img size=$((32 * 1048576)) seed=$RANDOM flushed
    local -a cfg=(E2E_NVME_BDF="$E2E_NVME_BDF" E2E_EXPECT_BYTES="$size" E2E_SEED="$seed")
    local nvme='{"driver":"nvme","serial":"selftest","drive":"disk0","bus":"pcie.0","addr":"0x4"}'
    truncate -s "$size" "$img"
    e2e_vm_start lost nvme.sh srvkill "nvme ext4" blk 512 "${cfg[@]}" -- \
        -drive "file=$img,if=none,id=disk0,format=raw,snapshot=on" -device "$nvme" || return
    e2e_vm_wait_for lost '^E2E-MARK busy' 300 || e2e_fail "guest 'lost' never reported three flushed files"
    e2e_vm_kill lost
    e2e_vm_expect lost bind setup
    [ "${#E2E_FAILURES[@]}" = 0 ] || return
    flushed=$(nvme_crash_flushed lost)
    e2e_vm_start lost-recover nvme.sh srvkill_recover "nvme ext4" blk 512 "${cfg[@]}" E2E_FLUSHED="$flushed" -- \
        -drive "file=$img,if=none,id=disk0,format=raw" -device "$nvme" || return
    e2e_vm_wait lost-recover 300
    e2e_vm_expect lost-recover bind recover
    selftest_expect_failure "flushed writes that never reach the backing file" \
        "guest 'lost-recover': recover mount after the server was killed failed"
}
