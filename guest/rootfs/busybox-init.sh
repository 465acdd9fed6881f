#!/bin/sh
# /sbin/init of the Hearth test root filesystems (installed by `cargo xtask rootfs`).
#
# Mounts the pseudo filesystems, then runs its arguments as one shell command (the kernel
# passes everything after `--` on its command line to init as argv), or an interactive shell
# on the console when there are none. It then prints `hearth-init: exit status N` on the
# console, syncs and resets the machine: the guest kernel is booted with `reboot=k`, and the
# VMM treats the resulting i8042 reset as the guest exiting.
#
# It runs on busybox (the busybox image) and on Debian's dash and util-linux (the Debian
# image), so it uses only commands both provide.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

# The kernel hands unknown `name=value` parameters to init as its environment: with
# `hearth_boot_marker=TEXT` on the command line, init prints TEXT on the console before
# anything else, the first moment userspace runs (the boot benchmark waits for it).
[ -n "$hearth_boot_marker" ] && echo "$hearth_boot_marker"

is_mounted() {
    grep -qs "^[^ ]* $1 " /proc/mounts
}

mount_once() {
    is_mounted "$3" || mount -t "$1" "$2" "$3" || echo "hearth-init: cannot mount $1 on $3"
}

# Debian minbase has no reboot(8): it resets through sysrq if the kernel has it, else through
# reboot(2) from python3. Should all fail, init exits and the kernel panics (`panic=-1` resets).
reset_machine() {
    sync
    if command -v reboot >/dev/null 2>&1; then
        reboot -f
    elif [ -e /proc/sysrq-trigger ]; then
        echo b >/proc/sysrq-trigger
    elif command -v python3 >/dev/null 2>&1; then
        python3 -c 'import ctypes; ctypes.CDLL(None).reboot(0x01234567)'
    fi
}

mount_once proc proc /proc
mount_once sysfs sysfs /sys
mount_once devtmpfs devtmpfs /dev
mount_once tmpfs tmpfs /tmp
mount_once tmpfs tmpfs /run
[ -r /etc/hostname ] && hostname "$(cat /etc/hostname)"

if [ "$#" -gt 0 ]; then
    /bin/sh -c "$*"
    status=$?
elif command -v cttyhack >/dev/null 2>&1; then
    # cttyhack opens the real console device so the shell gets job control.
    setsid cttyhack /bin/sh -l
    status=$?
else
    /bin/sh -l
    status=$?
fi

echo "hearth-init: exit status $status"
reset_machine
