#!/usr/bin/env bash
# Fetches QEMU 10 from Debian's bookworm-backports into target/qemu/ without changing the system:
# a private apt sources list and cache under target/qemu/apt, `apt-get install --download-only`
# (which computes the packages this machine lacks), and `dpkg -x` of each into target/qemu/root.
# Prints the wrapper to run it: target/qemu/qemu-system-x86_64 (sets LD_LIBRARY_PATH and -L).
#
#   scripts/fetch-qemu.sh            # idempotent: does nothing when the wrapper exists
#
# Firmware: boot our guest with `-bios target/qemu/fw/qboot.rom`. With SeaBIOS, on a host whose
# KVM emulates guest kernel mode (PVM), the APs stay in SeaBIOS's real-mode code and only one
# vCPU comes up; qboot leaves them waiting for INIT/SIPI.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/qemu
wrapper="$dir/qemu-system-x86_64"
if [ -x "$wrapper" ]; then
  echo "fetch-qemu: $wrapper already exists; nothing to do"
  exit 0
fi
apt_dir="$(pwd)/$dir/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
cat > "$apt_dir/sources.list" <<SOURCES
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-backports main
SOURCES
opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
      -o APT::Sandbox::User=root)
echo "fetch-qemu: apt-get update (private lists in $apt_dir)"
apt-get "${opts[@]}" update -qq
echo "fetch-qemu: downloading qemu-system-x86 from bookworm-backports and what this machine lacks"
apt-get "${opts[@]}" install -y -qq --download-only --no-install-recommends \
  -t bookworm-backports qemu-system-x86 qemu-system-data
rm -rf "$dir/root"
mkdir -p "$dir/root" "$dir/fw"
for deb in "$apt_dir"/cache/archives/*.deb; do
  dpkg -x "$deb" "$dir/root"
done
cp -L "$dir"/root/usr/share/qemu/*.bin "$dir"/root/usr/share/qemu/*.rom "$dir/fw/"
cp -L "$dir"/root/usr/share/seabios/*.bin "$dir/fw/" 2>/dev/null || true
root="$(pwd)/$dir/root"
cat > "$wrapper" <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$root/usr/bin/qemu-system-x86_64" -L "$(pwd)/$dir/fw" "\$@"
WRAP
chmod +x "$wrapper"
missing=$(LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" \
  ldd "$root/usr/bin/qemu-system-x86_64" | grep "not found" || true)
if [ -n "$missing" ]; then
  echo "fetch-qemu: libraries still missing:" >&2
  echo "$missing" >&2
  exit 1
fi
echo "fetch-qemu: $("$wrapper" --version | head -1) -> $wrapper"
