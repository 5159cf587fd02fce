# shellcheck shell=bash
# Configures and builds the iommufd guest kernel. Runs INSIDE the trixie root
# (fed to `kroot bash -s`), where the compiler and the build tools are.
# Arguments: DEB WORK FRAGMENT JOBS
#   DEB       Debian's linux-source-X.Y .deb (holds usr/src/linux-source-X.Y.tar.xz)
#   WORK      work directory: the source is unpacked to WORK/src, objects go to WORK/obj
#   FRAGMENT  the config fragment (iommufd.config)
#   JOBS      make -j
# On success WORK/obj holds arch/x86/boot/bzImage, .config and System.map.
#
# The config: `make tinyconfig` (allnoconfig plus the kernel's tiny.config
# fragments), the fragment merged on top with merge_config.sh, then
# `make olddefconfig` so that the options the fragment makes visible take
# their defaults. merge_config.sh only warns when a wanted value does not
# survive (a missing dependency), so every `CONFIG_X=y` and
# `# CONFIG_X is not set` line of the fragment is checked against the final
# .config, and the build stops if one differs.
set -euo pipefail
deb=$1 work=$2 frag=$3 jobs=$4
src=$work/src obj=$work/obj
say() { printf 'build: %s\n' "$*"; }

if [ ! -f "$src/Makefile" ]; then
    tarball=$(dpkg-deb -c "$deb" | awk '$6 ~ /\/usr\/src\/linux-source-.*\.tar\.xz$/ { print $6 }')
    [ -n "$tarball" ] || { say "no kernel tarball in $deb"; exit 1; }
    say "unpacking $tarball"
    rm -rf "$src.tmp"
    mkdir -p "$src.tmp"
    dpkg-deb --fsys-tarfile "$deb" | tar -xO "$tarball" | xz -dc | tar -x -C "$src.tmp" --strip-components=1
    mv "$src.tmp" "$src"
fi

# A fresh configuration every time: objects of an earlier configuration are
# reused by make where they still apply.
mkdir -p "$obj"
rm -f "$obj/.config"
m() { make -C "$src" O="$obj" ARCH=x86_64 KBUILD_BUILD_USER=vdevd KBUILD_BUILD_HOST=e2e "$@"; }
m -s tinyconfig
"$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$frag"
m -s olddefconfig

bad=0
while IFS= read -r line; do
    case $line in
    CONFIG_*=*)
        sym=${line%%=*}
        got=$(grep -E "^($sym=|# $sym is not set)" "$obj/.config" || true)
        [ "$got" = "$line" ] || { say "WANTED '$line', GOT '${got:-(absent: dependencies not met)}'"; bad=1; } ;;
    "# CONFIG_"*" is not set")
        sym=${line#\# }
        sym=${sym%% *}
        if grep -qE "^$sym=" "$obj/.config"; then
            say "WANTED '$line', GOT '$(grep -E "^$sym=" "$obj/.config")'"
            bad=1
        fi ;;
    esac
done <"$frag"
[ "$bad" = 0 ] || { say "the config fragment did not apply"; exit 1; }
say "config: $(grep -c '=y$' "$obj/.config") options =y, $(grep -c '=m$' "$obj/.config" || true) =m; fragment verified"

say "make -j$jobs bzImage ($(gcc --version | head -n1))"
m -j"$jobs" bzImage
say "kernelrelease $(m -s kernelrelease)"
