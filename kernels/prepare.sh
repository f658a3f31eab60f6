#!/usr/bin/env bash
# Prepares agentvm's default guest artefacts: Debian's cloud kernel (the distribution bzImage, the
# uncompressed ELF vmlinux inside it, and the whole extracted package for the nested test host), a
# static busybox, and the guest initramfs with the guest agent as /init.
#
# Usage: kernels/prepare.sh [--print | --update | --force] [--verify]
#   (no flag)  make sure the last prepared kernel (or, the first time, the current Debian kernel)
#              is intact, rebuild the guest agent (cargo, a no-op when fresh) and repack the
#              initramfs if the agent changed
#   --print    only check the last prepared artefacts and print them; prepare them if they are
#              missing or damaged (no apt look-up, no cargo build when the cache is good)
#   --update   as without a flag, but ask apt for the current Debian kernel first (apt-cache
#              rebuilds its cache on every call on hosts that keep none, ~1.5 s, hence not default)
#   --force    download and rebuild everything for the current Debian kernel
#   --verify   hash every cached file instead of trusting unchanged size+mtime+inode
# Environment: AGENTVM_CACHE overrides the cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/agentvm);
#   AGENTVM_GUEST_AGENT names a prebuilt static agent binary to use instead of building one.
# Output: on success, exactly these lines on stdout (progress and tool output go to stderr):
#   version=<kver> kernel=<vmlinux> initrd=<initramfs.cpio> vmlinuz=<bzImage> pkg=<pkg dir> busybox=<busybox>
set -euo pipefail
umask 022
export LC_ALL=C

readonly META_PKG=linux-image-cloud-amd64
readonly BUSYBOX_PKG=busybox-static
# What the guest agent loads at boot; their dependencies are added from modules.dep.
readonly GUEST_MODULES=(virtio virtio_ring virtio_mmio virtio_net virtio_blk virtio_rng vsock
	vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport fuse virtiofs)
readonly MANIFEST_FORMAT=1
readonly CACHED_FILES=(vmlinuz vmlinux busybox)

# fd 3 is the real stdout and carries only the final key=value lines; apt and cargo chatter on
# stdout would otherwise corrupt the machine-readable answer.
exec 3>&1 1>&2

say() { printf 'agentvm: %s\n' "$*" >&2; }
die() {
	printf 'agentvm: error: %s\n' "$*" >&2
	exit 1
}

MODE=ensure
FULL_VERIFY=0
while (($#)); do
	case $1 in
	--print | --update | --force)
		[[ $MODE == ensure ]] || die "--print, --update and --force exclude each other"
		MODE=${1#--}
		;;
	--verify) FULL_VERIFY=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
		exit 0
		;;
	*) die "unknown argument '$1' (try --help)" ;;
	esac
	shift
done

SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/$(basename "${BASH_SOURCE[0]}")
REPO=$(dirname "$(dirname "$SCRIPT")")

if [[ -n ${AGENTVM_CACHE:-} ]]; then
	CACHE_ROOT=$AGENTVM_CACHE
elif [[ -n ${XDG_CACHE_HOME:-} ]]; then
	CACHE_ROOT=$XDG_CACHE_HOME/agentvm
elif [[ -n ${HOME:-} ]]; then
	CACHE_ROOT=$HOME/.cache/agentvm
else
	die "no cache directory: set AGENTVM_CACHE (or HOME)"
fi
mkdir -p "$CACHE_ROOT" || die "cannot create cache directory $CACHE_ROOT"
CACHE_ROOT=$(cd "$CACHE_ROOT" && pwd -P)

# One preparer at a time per cache: concurrent `agentvm run`s would otherwise build into the same
# directory. Readers take the lock too, so they never see a directory being replaced.
exec 9>"$CACHE_ROOT/.lock"
if ! flock -n 9; then
	say "waiting for another kernels/prepare.sh using $CACHE_ROOT"
	flock 9
fi

# Everything is built under WORK (same filesystem as the cache) and renamed into place at the end,
# so an interrupted run leaves only a WORK directory behind, which the next run deletes.
WORK=$CACHE_ROOT/.tmp.$$
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
for stale in "$CACHE_ROOT"/.tmp.* "$CACHE_ROOT"/current.tmp.*; do
	if [[ -e $stale ]]; then rm -rf "$stale"; fi
done
mkdir -p "$WORK"

sha256() { sha256sum "$1" | cut -d' ' -f1; }
# Cheap identity of a file: any rewrite, truncation or replacement changes one of these.
statsig() { stat -c '%s:%.9Y:%i' "$1"; }

# ---------------------------------------------------------------------------------------------
# host tools

APT_UPDATED=0
APT_OPTS=(-q -o Dpkg::Use-Pty=0)
# apt-get download as root otherwise warns that the _apt user cannot write into our directory.
if ((EUID == 0)); then APT_OPTS+=(-o APT::Sandbox::User=root); fi

apt_update() {
	((APT_UPDATED == 0)) || return 1
	APT_UPDATED=1
	((EUID == 0)) || die "the apt package lists need refreshing and that needs root: run 'apt-get update' as root"
	say "refreshing apt package lists (apt-get update)"
	apt-get "${APT_OPTS[@]}" update >&2 || die "apt-get update failed"
}

ensure_tool() {
	local tool=$1 package=$2
	command -v "$tool" >/dev/null 2>&1 && return 0
	((EUID == 0)) || die "'$tool' is missing; install the Debian package '$package'"
	say "installing missing host tool $tool (apt-get install $package)"
	if ! DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "$package" >&2; then
		apt_update || true
		DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "$package" >&2 ||
			die "could not install $package"
	fi
	command -v "$tool" >/dev/null 2>&1 || die "$package is installed but '$tool' is still not on PATH"
}

# ---------------------------------------------------------------------------------------------
# ELF checks (readelf is part of binutils, which the Rust toolchain's linker needs anyway)

# elf_field FILE LABEL -> value of "LABEL: value" from readelf -h
elf_field() {
	local header
	header=$(readelf -h "$1" 2>/dev/null) || return 0
	awk -v key="$2" 'index($0, key ":") { sub(/^[^:]*: */, ""); print; exit }' <<<"$header"
}

check_x86_64_elf() {
	local file=$1 what=$2
	[[ $(elf_field "$file" Class) == ELF64 ]] || die "$what ($file) is not a 64-bit ELF file"
	[[ $(elf_field "$file" Machine) == *X86-64* ]] || die "$what ($file) is not an x86-64 ELF file"
}

check_static_exe() {
	local file=$1 what=$2
	check_x86_64_elf "$file" "$what"
	if readelf -lW "$file" | grep -q 'INTERP'; then
		die "$what ($file) is dynamically linked; the guest has no libc to load it with"
	fi
}

# ---------------------------------------------------------------------------------------------
# manifest: key=value lines; file.<name>=<sha256>, stat.<name>=<statsig>

declare -A MF=()
STALE_STAT=0
REASON=

load_manifest() {
	local dir=$1 line
	MF=()
	[[ -f $dir/manifest ]] || return 1
	while IFS= read -r line; do
		[[ $line == *=* && $line != \#* ]] || continue
		MF[${line%%=*}]=${line#*=}
	done <"$dir/manifest"
	[[ ${MF[format]:-} == "$MANIFEST_FORMAT" ]]
}

# verify_file DIR NAME: the file matches the manifest. Trusts an unchanged stat signature unless
# --verify; otherwise hashes, and flags the manifest for a refresh when only the stat moved (a
# copied cache, for example) so the next run is fast again.
verify_file() {
	local dir=$1 name=$2
	local want=${MF[file.$name]:-} sig=${MF[stat.$name]:-} now
	if [[ -z $want ]]; then
		REASON="$name is not in the manifest"
		return 1
	fi
	if [[ ! -f $dir/$name ]]; then
		REASON="$name is missing"
		return 1
	fi
	now=$(statsig "$dir/$name")
	if ((FULL_VERIFY == 0)) && [[ $now == "$sig" ]]; then
		return 0
	fi
	if [[ ${now%%:*} != "${sig%%:*}" ]]; then
		REASON="$name has the wrong size"
		return 1
	fi
	if [[ $(sha256 "$dir/$name") != "$want" ]]; then
		REASON="$name has the wrong checksum"
		return 1
	fi
	[[ $now == "$sig" ]] || STALE_STAT=1
}

pkg_tree_digest() {
	(cd "$1" && find . \( -type f -o -type l \) -printf '%y %P %s\n' | sort | sha256sum | cut -d' ' -f1)
}

kernel_stage_valid() {
	local dir=$1 kver=$2 name
	if ! load_manifest "$dir"; then
		REASON="no usable manifest"
		return 1
	fi
	if [[ ${MF[version]:-} != "$kver" ]]; then
		REASON="manifest is for another kernel"
		return 1
	fi
	for name in "${CACHED_FILES[@]}"; do
		verify_file "$dir" "$name" || return 1
	done
	if [[ ! -d $dir/pkg || $(pkg_tree_digest "$dir/pkg") != "${MF[pkg_tree_sha256]:-}" ]]; then
		REASON="the extracted package tree is incomplete"
		return 1
	fi
}

# initramfs_valid DIR [AGENT_SHA]: needs a loaded manifest (kernel_stage_valid first). Without
# AGENT_SHA any agent is accepted (--print must not need cargo).
initramfs_valid() {
	local dir=$1 agent_sha=${2:-}
	if [[ ${MF[recipe_sha256]:-} != "$RECIPE_SHA" ]]; then
		REASON="kernels/prepare.sh changed since the initramfs was packed"
		return 1
	fi
	if [[ -n $agent_sha && ${MF[agent_sha256]:-} != "$agent_sha" ]]; then
		REASON="the guest agent binary changed"
		return 1
	fi
	verify_file "$dir" initramfs.cpio
}

write_manifest() {
	local dir=$1 name tmp=$1/manifest.tmp.$$
	{
		echo "# agentvm guest artefacts, written by kernels/prepare.sh; do not edit"
		echo "format=$MANIFEST_FORMAT"
		for name in version kernel_package kernel_package_version busybox_package_version \
			pkg_tree_sha256 recipe_sha256 agent_sha256 modules; do
			if [[ -n ${MF[$name]:-} ]]; then echo "$name=${MF[$name]}"; fi
		done
		for name in "${CACHED_FILES[@]}" initramfs.cpio; do
			if [[ -n ${MF[file.$name]:-} && -f $dir/$name ]]; then
				echo "file.$name=${MF[file.$name]}"
				echo "stat.$name=$(statsig "$dir/$name")"
			fi
		done
	} >"$tmp"
	mv -f "$tmp" "$dir/manifest"
}

# ---------------------------------------------------------------------------------------------
# kernel stage: download, extract, vmlinux, busybox, modules.dep

KVER="" KPKG="" KPKG_VERSION=""

# Reads the versioned image package the meta package currently points at, e.g.
# "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)".
resolve_from_apt() {
	local out dep re='(linux-image-([0-9][^ ,|]*))( \(= ([^)]+)\))?'
	out=$(apt-cache show --no-all-versions "$META_PKG" 2>/dev/null) || return 1
	dep=$(sed -n 's/^Depends: //p' <<<"$out")
	[[ $dep =~ $re ]] || return 1
	KPKG=${BASH_REMATCH[1]}
	KVER=${BASH_REMATCH[2]}
	KPKG_VERSION=${BASH_REMATCH[4]}
}

resolve_version() {
	command -v apt-cache >/dev/null 2>&1 || return 1
	resolve_from_apt && return 0
	say "apt-cache does not know $META_PKG; refreshing the package lists"
	apt_update || return 1
	resolve_from_apt
}

# Offline fallback: the most recently written intact kernel stage.
newest_valid_cache() {
	local manifest dir
	while IFS= read -r manifest; do
		dir=$(dirname "$manifest")
		if kernel_stage_valid "$dir" "$(basename "$dir")"; then
			KVER=$(basename "$dir")
			KPKG=${MF[kernel_package]:-}
			KPKG_VERSION=${MF[kernel_package_version]:-}
			return 0
		fi
	done < <(ls -1t "$CACHE_ROOT"/*/manifest 2>/dev/null)
	return 1
}

download_packages() {
	local dest=$1 spec=$KPKG
	if [[ -n $KPKG_VERSION ]]; then spec=$KPKG=$KPKG_VERSION; fi
	say "downloading $KPKG${KPKG_VERSION:+ $KPKG_VERSION} and $BUSYBOX_PKG"
	rm -rf "$dest" && mkdir -p "$dest"
	(cd "$dest" && apt-get "${APT_OPTS[@]}" download "$spec" "$BUSYBOX_PKG" >&2)
}

u8_at() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' \n'; }
u32_at() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' \n'; }
hex_at() { od -An -tx1 -j "$2" -N"$3" "$1" | tr -d ' \n'; }

# The bzImage header says where the compressed kernel is (x86 boot protocol >= 2.08:
# payload_offset at 0x248 and payload_length at 0x24c, relative to the protected-mode code after
# the setup sectors); the kernel build appends the uncompressed size as a little-endian u32.
extract_vmlinux() {
	local img=$1 out=$2
	[[ $(hex_at "$img" $((0x202)) 4) == 48647253 ]] || die "$img is not a bzImage (no HdrS signature)"
	local setup_sects payload_off payload_len start magic strip=4 expected
	setup_sects=$(u8_at "$img" $((0x1f1)))
	((setup_sects != 0)) || setup_sects=4
	payload_off=$(u32_at "$img" $((0x248)))
	payload_len=$(u32_at "$img" $((0x24c)))
	start=$(((setup_sects + 1) * 512 + payload_off))
	expected=$(u32_at "$img" $((start + payload_len - 4)))
	magic=$(hex_at "$img" "$start" 6)
	local -a decompress
	case $magic in
	02214c18*)
		ensure_tool lz4 lz4
		decompress=(lz4 -dc)
		;;
	fd377a585a00)
		ensure_tool xz xz-utils
		decompress=(xz -dc)
		;;
	28b52ffd*)
		ensure_tool zstd zstd
		decompress=(zstd -dc)
		;;
	1f8b08*)
		# gzip carries its own size trailer, which is the appended size.
		strip=0
		decompress=(gzip -dc)
		;;
	*) die "unknown compression in $img (payload magic $magic at offset $start)" ;;
	esac
	say "extracting vmlinux from $(basename "$img") (${decompress[0]} payload at offset $start)"
	dd if="$img" bs=1M iflag=skip_bytes,count_bytes skip="$start" count=$((payload_len - strip)) status=none |
		"${decompress[@]}" >"$out" || die "decompressing the kernel payload failed"
	local size
	size=$(stat -c %s "$out")
	((size == expected)) || die "vmlinux is $size bytes, the bzImage says $expected"
	check_x86_64_elf "$out" vmlinux
	[[ $(elf_field "$out" Type) == EXEC* ]] || die "vmlinux is not an ELF executable"
	local entry
	entry=$(elf_field "$out" 'Entry point address')
	((entry != 0)) || die "vmlinux has no entry point"
	if command -v file >/dev/null 2>&1; then
		say "vmlinux: $(file -b "$out" | cut -d, -f1-2), entry $entry"
	fi
}

build_kernel_stage() {
	local dir=$1 stage=$WORK/kernel dl=$WORK/download
	local attempt deb bbdeb
	for attempt in 1 2; do
		download_packages "$dl" && break
		# Stale lists name a version the mirror no longer serves (security updates replace it).
		if ((attempt == 1)) && apt_update; then
			resolve_from_apt || die "$META_PKG is unknown to apt after apt-get update"
			dir=$CACHE_ROOT/$KVER
			DIR=$dir
			continue
		fi
		die "apt-get download of $KPKG failed"
	done
	local -a debs bbdebs
	debs=("$dl"/"$KPKG"_*.deb)
	bbdebs=("$dl"/"$BUSYBOX_PKG"_*.deb)
	deb=${debs[0]}
	bbdeb=${bbdebs[0]}
	[[ -f $deb && -f $bbdeb ]] || die "apt-get download did not produce the expected .deb files"

	MF=()
	MF[version]=$KVER
	MF[kernel_package]=$KPKG
	MF[kernel_package_version]=$(dpkg-deb -f "$deb" Version)
	MF[busybox_package_version]=$(dpkg-deb -f "$bbdeb" Version)

	say "unpacking $(basename "$deb")"
	mkdir -p "$stage"
	dpkg-deb -x "$deb" "$stage/pkg"
	[[ -f $stage/pkg/boot/vmlinuz-$KVER ]] || die "$KPKG has no boot/vmlinuz-$KVER"
	[[ -d $stage/pkg/lib/modules/$KVER ]] || die "$KPKG has no lib/modules/$KVER"
	cp "$stage/pkg/boot/vmlinuz-$KVER" "$stage/vmlinuz"
	extract_vmlinux "$stage/vmlinuz" "$stage/vmlinux"

	dpkg-deb -x "$bbdeb" "$WORK/busybox-pkg"
	cp "$WORK/busybox-pkg/bin/busybox" "$stage/busybox"
	chmod 0755 "$stage/busybox"
	check_static_exe "$stage/busybox" busybox
	"$stage/busybox" --list-full >/dev/null || die "the downloaded busybox does not run on this host"

	# Debian's package ships no modules.dep (the postinst runs depmod); busybox's depmod writes one
	# in the standard format without needing kmod on the host.
	say "generating modules.dep for $KVER"
	"$stage/busybox" depmod -b "$stage/pkg" "$KVER"
	[[ -s $stage/pkg/lib/modules/$KVER/modules.dep ]] || die "depmod produced no modules.dep"

	local name
	for name in "${CACHED_FILES[@]}"; do
		MF[file.$name]=$(sha256 "$stage/$name")
	done
	MF[pkg_tree_sha256]=$(pkg_tree_digest "$stage/pkg")

	rm -rf "$dir"
	mv -T "$stage" "$dir"
	write_manifest "$dir"
}

# ---------------------------------------------------------------------------------------------
# guest agent

AGENT_BIN="" AGENT_SHA=""

build_agent() {
	if [[ -n ${AGENTVM_GUEST_AGENT:-} ]]; then
		AGENT_BIN=$AGENTVM_GUEST_AGENT
		[[ -f $AGENT_BIN ]] || die "AGENTVM_GUEST_AGENT=$AGENT_BIN does not exist"
	else
		local target_dir=${CARGO_TARGET_DIR:-target}
		[[ $target_dir == /* ]] || target_dir=$REPO/$target_dir
		AGENT_BIN=$target_dir/x86_64-unknown-linux-gnu/release/agentvm-guest-agent
		if command -v cargo >/dev/null 2>&1; then
			[[ -f $AGENT_BIN ]] || say "building the guest agent (cargo build -p guest-agent --release)"
			# Not --quiet: when another build holds cargo's lock, its "Blocking waiting" line
			# explains the wait.
			(cd "$REPO" && cargo build -p guest-agent --release >&2) || die "building the guest agent failed"
		elif [[ -f $AGENT_BIN ]]; then
			say "cargo is not on PATH; using the existing $AGENT_BIN"
		else
			die "cargo is not on PATH and no guest agent binary exists at $AGENT_BIN"
		fi
	fi
	check_static_exe "$AGENT_BIN" "the guest agent"
	AGENT_SHA=$(sha256 "$AGENT_BIN")
}

# ---------------------------------------------------------------------------------------------
# initramfs

modname() {
	local base=${1##*/}
	base=${base%%.ko*}
	echo "${base//-/_}"
}

declare -A DEP_PATH=() DEP_LIST=() BUILTIN=() VISIT=()
ORDER=()

visit_module() {
	local mod=$1 dep
	case ${VISIT[$mod]:-} in
	"done") return 0 ;;
	active) die "module dependency cycle through $mod" ;;
	esac
	if [[ -z ${DEP_PATH[$mod]+set} ]]; then
		[[ -n ${BUILTIN[$mod]:-} ]] || die "module $mod is neither in modules.dep nor built into $KVER"
		say "module $mod is built into the kernel"
		VISIT[$mod]="done"
		return 0
	fi
	VISIT[$mod]=active
	for dep in ${DEP_LIST[$mod]}; do
		visit_module "$(modname "$dep")"
	done
	VISIT[$mod]="done"
	ORDER+=("$mod")
}

# Copies the guest modules and their dependencies (decompressed) into DEST and writes DEST/load-order,
# dependencies first.
select_modules() {
	local moddir=$1 dest=$2 line path mod src out
	while IFS= read -r line; do
		path=${line%%:*}
		mod=$(modname "$path")
		DEP_PATH[$mod]=$path
		DEP_LIST[$mod]=${line#*:}
	done <"$moddir/modules.dep"
	if [[ -f $moddir/modules.builtin ]]; then
		while IFS= read -r path; do
			BUILTIN[$(modname "$path")]=1
		done <"$moddir/modules.builtin"
	fi
	for mod in "${GUEST_MODULES[@]}"; do
		visit_module "$mod"
	done
	mkdir -p "$dest"
	: >"$dest/load-order"
	for mod in "${ORDER[@]}"; do
		src=$moddir/${DEP_PATH[$mod]}
		out=${src##*/}
		out=${out%%.ko*}.ko
		case $src in
		*.ko) cp "$src" "$dest/$out" ;;
		*.ko.xz)
			ensure_tool xz xz-utils
			xz -dc "$src" >"$dest/$out"
			;;
		*.ko.zst)
			ensure_tool zstd zstd
			zstd -qdc "$src" >"$dest/$out"
			;;
		*.ko.gz) gzip -dc "$src" >"$dest/$out" ;;
		*) die "unsupported module file $src" ;;
		esac
		echo "$out" >>"$dest/load-order"
	done
	say "guest modules (load order): ${ORDER[*]}"
}

build_initramfs() {
	local dir=$1 root=$WORK/root applet
	ensure_tool cpio cpio
	say "packing initramfs for $KVER (agent sha256 ${AGENT_SHA:0:12})"
	rm -rf "$root"
	mkdir -p "$root"/{bin,dev,etc,proc,root,run,sys,tmp,lib/modules}
	chmod 1777 "$root/tmp"
	chmod 0700 "$root/root"
	install -m 0755 "$AGENT_BIN" "$root/init"
	install -m 0755 "$dir/busybox" "$root/bin/busybox"
	while IFS= read -r applet; do
		[[ -n $applet && $applet != bin/busybox ]] || continue
		mkdir -p "$root/$(dirname "$applet")"
		ln -s /bin/busybox "$root/$applet"
	done < <("$dir/busybox" --list-full)
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
	printf 'root:x:0:\ntty:x:5:\nnobody:x:65534:\n' >"$root/etc/group"
	# The kernel opens /dev/console for init's stdio before init runs; without the node init starts
	# with no stdio (the agent copes, but kernel-side warnings are clearer with it). Needs root.
	if ! mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null; then
		say "not root: the initramfs has no /dev/console node (the agent opens it after mounting devtmpfs)"
	fi
	ORDER=()
	select_modules "$dir/pkg/lib/modules/$KVER" "$root/lib/modules"
	MF[modules]=$(
		IFS=,
		echo "${ORDER[*]}"
	)

	# Fixed timestamps, owners and inode numbers and a sorted file list make the archive a function
	# of its inputs, so the same agent and kernel always give the same initramfs.
	find "$root" -exec touch -h -d @0 {} +
	local tmp=$WORK/initramfs.cpio
	(cd "$root" && find . -mindepth 1 -printf '%P\n' | sort |
		cpio -o -H newc --owner 0:0 --reproducible --quiet) >"$tmp" || die "cpio failed"
	cpio -it --quiet <"$tmp" >"$WORK/initramfs.list" || die "cannot list the packed initramfs"
	grep -qx init "$WORK/initramfs.list" || die "the packed initramfs has no /init"
	mv -f "$tmp" "$dir/initramfs.cpio"
	MF[file.initramfs.cpio]=$(sha256 "$dir/initramfs.cpio")
	MF[agent_sha256]=$AGENT_SHA
	MF[recipe_sha256]=$RECIPE_SHA
	write_manifest "$dir"
}

# ---------------------------------------------------------------------------------------------

emit() {
	local dir=$1
	printf '%s\n' "$KVER" >"$CACHE_ROOT/current.tmp.$$"
	mv -f "$CACHE_ROOT/current.tmp.$$" "$CACHE_ROOT/current"
	printf 'version=%s\nkernel=%s\ninitrd=%s\nvmlinuz=%s\npkg=%s\nbusybox=%s\n' \
		"$KVER" "$dir/vmlinux" "$dir/initramfs.cpio" "$dir/vmlinuz" "$dir/pkg" "$dir/busybox" >&3
}

RECIPE_SHA=$(sha256 "$SCRIPT")

if [[ $MODE == print ]]; then
	KVER=$(cat "$CACHE_ROOT/current" 2>/dev/null || true)
	if [[ -n $KVER && $KVER != */* ]] && kernel_stage_valid "$CACHE_ROOT/$KVER" "$KVER" &&
		initramfs_valid "$CACHE_ROOT/$KVER"; then
		((STALE_STAT == 0)) || write_manifest "$CACHE_ROOT/$KVER"
		emit "$CACHE_ROOT/$KVER"
		exit 0
	fi
	if [[ -n $KVER ]]; then
		say "cached artefacts for $KVER are not usable ($REASON); preparing"
	else
		say "no prepared artefacts in $CACHE_ROOT; preparing"
	fi
	MODE=ensure
fi

KERNEL_OK=0
if [[ $MODE == ensure ]]; then
	KVER=$(cat "$CACHE_ROOT/current" 2>/dev/null || true)
	if [[ -n $KVER && $KVER != */* ]] && kernel_stage_valid "$CACHE_ROOT/$KVER" "$KVER"; then
		KPKG=${MF[kernel_package]:-}
		KPKG_VERSION=${MF[kernel_package_version]:-}
		KERNEL_OK=1
	else
		KVER=
	fi
fi
if [[ -z $KVER ]]; then
	command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found: kernels/prepare.sh needs a Debian-based host (apt, dpkg)"
	if ! resolve_version; then
		newest_valid_cache || die "cannot find the current $META_PKG with apt and no usable cached kernel exists in $CACHE_ROOT"
		say "warning: apt cannot resolve $META_PKG; using the cached kernel $KVER"
	fi
fi
DIR=$CACHE_ROOT/$KVER

if [[ $MODE == force ]]; then
	say "--force: rebuilding everything for $KVER"
	build_kernel_stage "$DIR"
elif ((KERNEL_OK == 0)) && ! kernel_stage_valid "$DIR" "$KVER"; then
	if [[ -e $DIR ]]; then say "cached kernel $KVER is not usable ($REASON); rebuilding it"; fi
	build_kernel_stage "$DIR"
fi

build_agent
STALE_STAT=0
if [[ $MODE == force ]] || ! initramfs_valid "$DIR" "$AGENT_SHA"; then
	if [[ $MODE != force ]]; then say "initramfs needs repacking: $REASON"; fi
	build_initramfs "$DIR"
elif ((STALE_STAT)); then
	write_manifest "$DIR"
fi
emit "$DIR"
