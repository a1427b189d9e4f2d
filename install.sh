#!/usr/bin/env bash
# FireRunner installer for Ubuntu 22.04+, Debian 11+, Rocky/RHEL/Alma 9+.
#
#   sudo ./install.sh --gitlab-url https://gitlab.example.com [options]
#   sudo ./install.sh --uninstall [--purge]
#
# Installs the firerunner binary, /etc/firerunner/config.yaml (documented,
# never overwritten), a generated webhook secret (0600), the `firerunner`
# system user (the uid VMs run as), a systemd unit, firecracker + jailer
# (from --firecracker-bin/--jailer-bin or the official release, checksum
# verified), the guest image, and ends with `firerunner doctor`.
# Idempotent: a second run changes nothing. Run with --help for options.
set -euo pipefail

FC_VERSION_DEFAULT=v1.16.0

usage() {
	cat <<EOF
usage: install.sh [options]
  --gitlab-url URL         GitLab URL written into a new config.yaml
  --listen ADDR            webhook/metrics listen address for a new config (default :8080)
  --driver NAME            firecracker (default) or qemu (development only), for a new config
  --dns IP[,IP]            resolvers for VMs (default: the host's upstream resolvers)
  --bin PATH               firerunner binary to install (default: bin/firerunner next to this script)
  --firecracker-bin PATH   install this firecracker binary instead of downloading
  --jailer-bin PATH        install this jailer binary instead of downloading
  --firecracker-version V  official release to download (default $FC_VERSION_DEFAULT)
  --firecracker-sha256 H   expected sha256 of the release tarball; without it the tarball is
                           checked against the release's own .sha256.txt (catches corruption,
                           not a compromised download site): pin it for production
  --no-download            never download anything
  --image DIR              install this built guest image (manifest.json + artefacts)
  --build-image            build the guest image with 'firerunner image build' (needs debootstrap
                           and a Debian mirror; pass --agent-bin and --gitlab-runner-bin)
  --agent-bin PATH         firerunner-agent for --build-image
  --gitlab-runner-bin PATH gitlab-runner for --build-image
  --root DIR, --prefix DIR install into DIR instead of / (tests, image building); skips
                           systemctl, modprobe, sysctl and doctor, which act on the running host
  --registry-mirror        set up the CNCF distribution registry (Debian docker-registry) as a
                           pull-through cache of Docker Hub on the VM bridge address for the
                           guests' dockerd (docker.registry_mirror in a new config)
  --registry-mirror-port N its port (default 5000)
  --no-doctor              do not run 'firerunner doctor' at the end
  --force                  install on an unsupported OS
  --uninstall              remove FireRunner (keeps /var/lib/firerunner and /etc/firerunner)
  --purge                  with --uninstall: also remove state, config, secrets and the user
EOF
}

ROOT=/
BIN=
FC_BIN=
JAILER_BIN=
FC_VERSION=$FC_VERSION_DEFAULT
FC_SHA256=
DOWNLOAD=1
IMAGE=
BUILD_IMAGE=0
AGENT_BIN=
RUNNER_BIN=
GITLAB_URL=https://gitlab.example.com
LISTEN=:8080
DRIVER=firecracker
DNS=
RUN_DOCTOR=1
FORCE=0
UNINSTALL=0
PURGE=0
DNS_YAML=
FR_UID=
FR_GID=
MIRROR=0
MIRROR_PORT=5000
MIRROR_URL=
HOST_PORTS=

while [ $# -gt 0 ]; do
	case "$1" in
	--root | --prefix) ROOT=$2; shift ;;
	--root=* | --prefix=*) ROOT=${1#*=} ;;
	--bin) BIN=$2; shift ;;
	--firecracker-bin) FC_BIN=$2; shift ;;
	--jailer-bin) JAILER_BIN=$2; shift ;;
	--firecracker-version) FC_VERSION=$2; shift ;;
	--firecracker-sha256) FC_SHA256=$2; shift ;;
	--no-download) DOWNLOAD=0 ;;
	--image) IMAGE=$2; shift ;;
	--build-image) BUILD_IMAGE=1 ;;
	--agent-bin) AGENT_BIN=$2; shift ;;
	--gitlab-runner-bin) RUNNER_BIN=$2; shift ;;
	--gitlab-url) GITLAB_URL=$2; shift ;;
	--listen) LISTEN=$2; shift ;;
	--driver) DRIVER=$2; shift ;;
	--dns) DNS=$2; shift ;;
	--registry-mirror) MIRROR=1 ;;
	--registry-mirror-port) MIRROR_PORT=$2; shift ;;
	--no-doctor) RUN_DOCTOR=0 ;;
	--force) FORCE=1 ;;
	--uninstall) UNINSTALL=1 ;;
	--purge) PURGE=1 ;;
	-h | --help) usage; exit 0 ;;
	*) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
	esac
	shift
done

say() { echo "firerunner-install: $*"; }
die() { echo "firerunner-install: ERROR: $*" >&2; exit 1; }
CHANGED=0
changed() { CHANGED=$((CHANGED + 1)); say "$*"; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo ./install.sh ...)"
ROOT=$(realpath -m "$ROOT")
case "$DRIVER" in firecracker | qemu) ;; *) die "--driver must be firecracker or qemu" ;; esac
[ "$DRIVER" = qemu ] && say "NOTE: --driver qemu is for development: QEMU runs as root, confined only by its seccomp sandbox (the config says qemu.allow_for_development: true); use firecracker in production"
R() { if [ "$ROOT" = / ]; then echo "$1"; else echo "$ROOT$1"; fi; }
ON_HOST=0
[ "$ROOT" = / ] && ON_HOST=1
SYSTEMD=0
if [ $ON_HOST = 1 ] && [ -d /run/systemd/system ]; then SYSTEMD=1; fi

BINDIR=/usr/local/bin
CONFDIR=/etc/firerunner
STATEDIR=/var/lib/firerunner
UNIT=/etc/systemd/system/firerunner.service
SYSCTL=/etc/sysctl.d/60-firerunner.conf
SYSCTL_MIRROR=/etc/sysctl.d/61-firerunner-mirror.conf
MODULES=/etc/modules-load.d/firerunner.conf
FC_MARKER=$CONFDIR/.installed-vmm
USER_NAME=firerunner
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PKG=$HERE/packaging

userflags=()
[ $ON_HOST = 1 ] || userflags=(--prefix "$ROOT")

# ---------------------------------------------------------------- helpers

lookup_id() { # lookup_id passwd|group NAME -> numeric id or empty
	awk -F: -v n="$2" '$1 == n { print $3; exit }' "$(R /etc/"$1")" 2>/dev/null || true
}

# ensure_dir PATH MODE UID GID
ensure_dir() {
	local d
	d=$(R "$1")
	if [ ! -d "$d" ]; then
		install -d -m "$2" -o "$3" -g "$4" "$d"
		changed "created $1"
	fi
	fix_meta "$1" "$2" "$3" "$4"
}

# fix_meta PATH MODE UID GID: correct mode/owner only when they differ.
fix_meta() {
	local p cur
	p=$(R "$1")
	cur=$(stat -c '%a %u %g' "$p")
	if [ "$cur" != "$(printf '%o' "0$2") $3 $4" ]; then
		chmod "$2" "$p"
		chown "$3:$4" "$p"
		changed "fixed mode/owner of $1 ($cur -> $2 $3 $4)"
	fi
}

# install_file SRC DST MODE UID GID: copy only when the content differs.
install_file() {
	local dst
	dst=$(R "$2")
	if [ -f "$dst" ] && cmp -s "$1" "$dst"; then
		fix_meta "$2" "$3" "$4" "$5"
		return
	fi
	install -D -m "$3" -o "$4" -g "$5" "$1" "$dst"
	changed "installed $2"
}

render() { # render TEMPLATE > out, replacing @KEY@ placeholders
	sed -e "s|@BINDIR@|$BINDIR|g" -e "s|@CONFDIR@|$CONFDIR|g" -e "s|@STATEDIR@|$STATEDIR|g" -e "s|@STOP_TIMEOUT@|${STOP_TIMEOUT:-}|g" \
		-e "s|@GITLAB_URL@|$GITLAB_URL|g" -e "s|@LISTEN@|$LISTEN|g" -e "s|@DRIVER@|$DRIVER|g" \
		-e "s|@UID@|$FR_UID|g" -e "s|@GID@|$FR_GID|g" -e "s|@DNS@|$DNS_YAML|g" \
		-e "s|@REGISTRY_MIRROR@|$MIRROR_URL|g" -e "s|@HOST_PORTS@|$HOST_PORTS|g" \
		-e "s|@QEMU_DEV@|$([ "$DRIVER" = qemu ] && echo true || echo false)|g" "$1"
}

duration_seconds() { # duration_seconds GO_DURATION -> whole seconds (rounded up), e.g. 1h30m, 10m0s, 90s
	local d=$1 total=0 n u
	[ -n "$d" ] || return 1
	[ "$d" = 0 ] && { echo 0; return; }
	while [ -n "$d" ]; do
		[[ $d =~ ^([0-9]+)(h|ms|us|µs|ns|m|s)(.*)$ ]] || return 1
		n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]} d=${BASH_REMATCH[3]}
		case $u in
		h) total=$((total + n * 3600)) ;;
		m) total=$((total + n * 60)) ;;
		s) total=$((total + n)) ;;
		*) [ "$n" = 0 ] || total=$((total + 1)) ;;
		esac
	done
	echo "$total"
}

host_dns() { # upstream resolvers VMs can reach (not 127.0.0.53 & co.)
	local f
	for f in /run/systemd/resolve/resolv.conf /etc/resolv.conf; do
		f=$(R "$f")
		[ -r "$f" ] || continue
		awk '$1 == "nameserver" && $2 ~ /^[0-9.]+$/ && $2 !~ /^127\./ { print $2 }' "$f" | head -3 | paste -sd, -
		return
	done
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# ---------------------------------------------------------------- uninstall

if [ $UNINSTALL = 1 ]; then
	if [ $SYSTEMD = 1 ] && [ -f "$UNIT" ]; then
		systemctl disable --now firerunner.service || true
	elif [ $ON_HOST = 0 ]; then
		say "not touching systemd: installing under --root $ROOT"
	fi
	if [ $ON_HOST = 1 ]; then # what the daemon made on the host's network
		br=$(awk '$1 == "bridge:" { print $2; exit }' "$CONFDIR/config.yaml" 2>/dev/null || true)
		for fam in inet bridge; do # NAT and isolation (inet), MAC/IP pinning per tap (bridge)
			if nft list table "$fam" firerunner >/dev/null 2>&1; then
				nft delete table "$fam" firerunner && say "removed nftables table $fam firerunner"
			fi
		done
		# VMs' taps are named after their VM ids (fr- and 1-12 of [a-z0-9]).
		for dev in $(ip -o link show 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | grep -E '^fr-[a-z0-9]{1,12}$' || true); do
			ip link del "$dev" && say "removed tap $dev"
		done
		if ip link show "${br:-firerunner0}" >/dev/null 2>&1; then
			ip link del "${br:-firerunner0}" && say "removed bridge ${br:-firerunner0}"
		fi
	fi
	files=("$BINDIR/firerunner" "$UNIT" "$SYSCTL" "$MODULES" "$SYSCTL_MIRROR" /etc/systemd/system/docker-registry.service.d/firerunner.conf)
	if [ -f "$(R "$FC_MARKER")" ]; then
		while read -r f; do files+=("$f"); done <"$(R "$FC_MARKER")"
		files+=("$FC_MARKER")
	fi
	for f in "${files[@]}"; do
		if [ -e "$(R "$f")" ]; then rm -f "$(R "$f")"; say "removed $f"; fi
	done
	[ $SYSTEMD = 1 ] && systemctl daemon-reload
	if [ $PURGE = 1 ]; then
		for d in "$CONFDIR" "$STATEDIR" /srv/jailer /var/cache/firerunner; do
			if [ -e "$(R "$d")" ]; then rm -rf "$(R "$d")"; say "removed $d"; fi
		done
		if [ -n "$(lookup_id passwd $USER_NAME)" ]; then
			userdel "${userflags[@]}" "$USER_NAME" && say "removed user $USER_NAME"
		fi
		if [ -n "$(lookup_id group $USER_NAME)" ]; then
			groupdel "${userflags[@]}" "$USER_NAME" && say "removed group $USER_NAME"
		fi
	else
		say "kept $STATEDIR, $CONFDIR and user $USER_NAME (use --uninstall --purge to remove them)"
	fi
	exit 0
fi

# ---------------------------------------------------------------- checks

if [ $ON_HOST = 1 ]; then
	. /etc/os-release 2>/dev/null || die "no /etc/os-release: unsupported OS"
	major=${VERSION_ID%%.*}
	ok=0
	case "${ID:-}" in
	ubuntu) [ "${major:-0}" -ge 22 ] && ok=1 ;;
	debian) [ "${major:-0}" -ge 11 ] && ok=1 ;;
	rocky | rhel | almalinux | centos) [ "${major:-0}" -ge 9 ] && ok=1 ;;
	esac
	if [ $ok = 0 ]; then
		[ $FORCE = 1 ] || die "unsupported OS ${PRETTY_NAME:-unknown} (supported: Ubuntu 22.04+, Debian 11+, Rocky/RHEL 9+; --force to try anyway)"
		say "WARNING: unsupported OS ${PRETTY_NAME:-unknown}, continuing (--force)"
	fi
else
	say "installing into $ROOT: skipping the OS check, systemctl, modprobe, sysctl and doctor (they act on the running host)"
fi

if [ -z "$BIN" ]; then
	for c in "$HERE/bin/firerunner" "$HERE/firerunner"; do [ -x "$c" ] && BIN=$c && break; done
fi
[ -n "$BIN" ] && [ -x "$BIN" ] || die "no firerunner binary: build it (make build) or pass --bin PATH"

# ---------------------------------------------------------------- user

if [ -z "$(lookup_id passwd $USER_NAME)" ]; then
	nologin=/usr/sbin/nologin
	[ -x "$(R $nologin)" ] || [ $ON_HOST = 0 ] || nologin=/sbin/nologin
	useradd "${userflags[@]}" --system --user-group --no-create-home --home-dir "$STATEDIR" \
		--shell "$nologin" --comment "FireRunner microVMs" "$USER_NAME"
	changed "created system user $USER_NAME"
fi
FR_UID=$(lookup_id passwd $USER_NAME)
FR_GID=$(lookup_id group $USER_NAME)
[ -n "$FR_UID" ] && [ -n "$FR_GID" ] || die "user $USER_NAME has no uid/gid after useradd"

# ---------------------------------------------------------------- files

ensure_dir "$CONFDIR" 0750 0 "$FR_GID"
# 0700 root: the mode the daemon's store sets at every start (store.DirMode),
# so a re-run after the daemon started changes nothing.
ensure_dir "$STATEDIR" 0700 0 0
ensure_dir /var/cache/firerunner 0750 0 0
if [ "$DRIVER" = firecracker ]; then ensure_dir /srv/jailer 0750 0 "$FR_GID"; fi

install_file "$BIN" "$BINDIR/firerunner" 0755 0 0

# The registry mirror listens on the VM bridge's address (the first of
# network.cidr, 172.30.0.1 by default): only VMs and this host reach it.
BRIDGE_IP=172.30.0.1
if [ -e "$(R "$CONFDIR/config.yaml")" ]; then
	cidr=$(awk '/^network:/ { n = 1; next } /^[^[:space:]#]/ { n = 0 } n && $1 == "cidr:" { print $2; exit }' "$(R "$CONFDIR/config.yaml")" | tr -d "\"'")
	if [[ ${cidr:-} =~ ^([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)/ ]]; then
		BRIDGE_IP=${BASH_REMATCH[1]}.${BASH_REMATCH[2]}.${BASH_REMATCH[3]}.$((BASH_REMATCH[4] + 1))
	fi
fi
if [ $MIRROR = 1 ]; then
	[[ $MIRROR_PORT =~ ^[0-9]+$ ]] && [ "$MIRROR_PORT" -ge 1 ] && [ "$MIRROR_PORT" -le 65535 ] || die "--registry-mirror-port must be a port number"
	MIRROR_URL=http://$BRIDGE_IP:$MIRROR_PORT
	HOST_PORTS=$MIRROR_PORT
fi

if [ ! -e "$(R "$CONFDIR/config.yaml")" ]; then
	[ -n "$DNS" ] || DNS=$(host_dns)
	[ -n "$DNS" ] || DNS=1.1.1.1,8.8.8.8
	DNS_YAML=$(echo "$DNS" | tr ',' '\n' | sed 's/.*/"&"/' | paste -sd, - | sed 's/,/, /g')
	render "$PKG/config.yaml" >"$TMP/config.yaml"
	install -m 0640 -o 0 -g "$FR_GID" "$TMP/config.yaml" "$(R "$CONFDIR/config.yaml")"
	changed "wrote $CONFDIR/config.yaml (edit gitlab.url and review it)"
else
	fix_meta "$CONFDIR/config.yaml" 0640 0 "$FR_GID"
fi

secret=$(R "$CONFDIR/.webhook_secret")
if [ ! -s "$secret" ]; then
	(umask 077 && head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$secret.tmp" && mv "$secret.tmp" "$secret")
	chown 0:0 "$secret"
	changed "generated the webhook secret $CONFDIR/.webhook_secret (0600)"
else
	fix_meta "$CONFDIR/.webhook_secret" 0600 0 0
fi
if [ -e "$(R "$CONFDIR/.gitlab_token")" ]; then fix_meta "$CONFDIR/.gitlab_token" 0600 0 0; fi

# TimeoutStopSec covers what `firerunner serve` takes after SIGTERM:
# limits.drain_timeout, then up to 3 min of cleanup (daemon.CleanupTimeout),
# then 10 s of HTTP shutdown, plus a margin; derived from the config on every
# run, so a changed drain_timeout updates the unit.
drain=$(awk '/^limits:/ { l = 1; next } /^[^[:space:]#]/ { l = 0 } l && $1 == "drain_timeout:" { print $2; exit }' "$(R "$CONFDIR/config.yaml")" | tr -d "\"'")
drain_s=$(duration_seconds "${drain:-10m}") || { say "WARNING: cannot read limits.drain_timeout '$drain'; assuming 10m"; drain_s=600; }
STOP_TIMEOUT=$((drain_s + 180 + 30))
render "$PKG/firerunner.service" >"$TMP/firerunner.service"
unit_before=$CHANGED
install_file "$TMP/firerunner.service" "$UNIT" 0644 0 0
UNIT_CHANGED=$((CHANGED - unit_before))
printf '# Written by FireRunner install.sh: VMs reach the network through NAT.\nnet.ipv4.ip_forward = 1\n' >"$TMP/sysctl"
sysctl_before=$CHANGED
install_file "$TMP/sysctl" "$SYSCTL" 0644 0 0
printf '# Written by FireRunner install.sh: taps, KVM and nftables.\ntun\nkvm\nnf_tables\n' >"$TMP/modules"
install_file "$TMP/modules" "$MODULES" 0644 0 0
if [ $ON_HOST = 1 ]; then
	[ $CHANGED = "$sysctl_before" ] || sysctl -q -p "$SYSCTL" || say "WARNING: could not apply $SYSCTL"
	modprobe -a tun kvm nf_tables 2>/dev/null || true
fi

# ---------------------------------------------------------------- firecracker + jailer

fc_installed=()
install_vmm() { # install_vmm SRC NAME
	install_file "$1" "$BINDIR/$2" 0755 0 0
	fc_installed+=("$BINDIR/$2")
}
if [ -n "$FC_BIN" ] || [ -n "$JAILER_BIN" ]; then
	[ -n "$FC_BIN" ] && [ -n "$JAILER_BIN" ] || die "pass both --firecracker-bin and --jailer-bin"
	install_vmm "$FC_BIN" firecracker
	install_vmm "$JAILER_BIN" jailer
elif [ "$DRIVER" = firecracker ] && ! { [ -x "$(R $BINDIR/firecracker)" ] && [ -x "$(R $BINDIR/jailer)" ]; }; then
	arch=$(uname -m)
	# FIRERUNNER_FC_RELEASE_URL points at a mirror (the installer test serves one on loopback).
	base=${FIRERUNNER_FC_RELEASE_URL:-https://github.com/firecracker-microvm/firecracker/releases/download}/$FC_VERSION
	tgz=firecracker-$FC_VERSION-$arch.tgz
	if [ $DOWNLOAD = 0 ]; then
		say "WARNING: firecracker/jailer missing and --no-download given; pass --firecracker-bin/--jailer-bin"
	elif ! curl -fsSIL --max-time 15 "$base/$tgz" >/dev/null 2>&1; then
		say "WARNING: cannot reach $base/$tgz (no internet?): download it yourself and pass --firecracker-bin/--jailer-bin"
	else
		say "downloading Firecracker $FC_VERSION ($arch)"
		curl -fsSL --retry 3 -o "$TMP/$tgz" "$base/$tgz"
		curl -fsSL --retry 3 -o "$TMP/$tgz.sha256.txt" "$base/$tgz.sha256.txt"
		(cd "$TMP" && sha256sum -c --strict "$tgz.sha256.txt") || die "checksum mismatch for $tgz"
		if [ -n "$FC_SHA256" ]; then
			echo "$FC_SHA256  $tgz" | (cd "$TMP" && sha256sum -c --strict -) || die "$tgz does not match --firecracker-sha256"
		else
			say "NOTE: $tgz verified against the release's .sha256.txt only; pin it with --firecracker-sha256"
		fi
		tar -xzf "$TMP/$tgz" -C "$TMP"
		rel=$TMP/release-$FC_VERSION-$arch
		install_vmm "$rel/firecracker-$FC_VERSION-$arch" firecracker
		install_vmm "$rel/jailer-$FC_VERSION-$arch" jailer
	fi
fi
if [ ${#fc_installed[@]} -gt 0 ]; then # remember what --uninstall must remove
	printf '%s\n' "${fc_installed[@]}" >"$TMP/marker"
	install_file "$TMP/marker" "$FC_MARKER" 0644 0 0
fi

# ---------------------------------------------------------------- guest image

img=$STATEDIR/image
if [ -n "$IMAGE" ]; then
	src=$(realpath "$IMAGE")
	[ -f "$src/manifest.json" ] || die "--image $IMAGE has no manifest.json"
	ensure_dir "$img" 0755 0 0
	for f in "$src"/*; do
		[ -f "$f" ] && install_file "$f" "$img/$(basename "$f")" 0644 0 0
	done
elif [ $BUILD_IMAGE = 1 ]; then
	args=(image build --out "$(R "$img")")
	[ -n "$AGENT_BIN" ] && args+=(--agent "$AGENT_BIN")
	[ -n "$RUNNER_BIN" ] && args+=(--gitlab-runner "$RUNNER_BIN")
	say "building the guest image (minutes on first run)"
	"$(R $BINDIR/firerunner)" "${args[@]}"
elif [ ! -e "$(R "$img/manifest.json")" ]; then
	say "WARNING: no guest image in $img: re-run with --image DIR or --build-image"
fi

# ---------------------------------------------------------------- registry mirror

if [ $MIRROR = 1 ]; then
	if [ $ON_HOST = 1 ] && ! command -v docker-registry >/dev/null; then
		command -v apt-get >/dev/null || die "--registry-mirror needs the docker-registry package (Debian/Ubuntu); install the CNCF distribution registry yourself"
		say "installing docker-registry (the CNCF distribution registry)"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry >/dev/null
		changed "installed docker-registry"
	fi
	# A pull-through cache of Docker Hub (proxy.remoteurl) on the bridge
	# address only; the blobs stay on this host's disk.
	cat >"$TMP/registry.yml" <<EOF
# Written by FireRunner install.sh --registry-mirror: a pull-through cache of
# Docker Hub for the VMs' dockerd (docker.registry_mirror: $MIRROR_URL).
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: /var/lib/docker-registry
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $BRIDGE_IP:$MIRROR_PORT
proxy:
  remoteurl: https://registry-1.docker.io
EOF
	mirror_before=$CHANGED
	install_file "$TMP/registry.yml" /etc/docker/registry/config.yml 0644 0 0
	# The bridge exists only while FireRunner runs: start after it, retry,
	# and allow binding the bridge address before the bridge has it.
	printf '[Unit]\nAfter=firerunner.service\n[Service]\nRestart=always\nRestartSec=5\n' >"$TMP/mirror.conf"
	install_file "$TMP/mirror.conf" /etc/systemd/system/docker-registry.service.d/firerunner.conf 0644 0 0
	printf '# Written by FireRunner install.sh: the registry mirror binds the bridge address early.\nnet.ipv4.ip_nonlocal_bind = 1\n' >"$TMP/sysctl-mirror"
	install_file "$TMP/sysctl-mirror" "$SYSCTL_MIRROR" 0644 0 0
	if [ $ON_HOST = 1 ]; then
		sysctl -q -w net.ipv4.ip_nonlocal_bind=1 || true
		if [ $SYSTEMD = 1 ] && [ "$CHANGED" != "$mirror_before" ]; then
			systemctl daemon-reload
			systemctl enable --quiet docker-registry.service || true
			systemctl restart docker-registry.service && say "docker-registry restarted: pull-through cache on $BRIDGE_IP:$MIRROR_PORT"
		fi
	fi
	if ! grep -q "registry_mirror: \"$MIRROR_URL\"" "$(R "$CONFDIR/config.yaml")"; then
		say "NOTE: $CONFDIR/config.yaml predates --registry-mirror: set docker.registry_mirror: $MIRROR_URL and add $MIRROR_PORT to network.allow_host_ports"
	fi
fi

# ---------------------------------------------------------------- systemd

if [ $SYSTEMD = 1 ]; then
	[ "$UNIT_CHANGED" = 0 ] || systemctl daemon-reload
	systemctl is-enabled --quiet firerunner.service || { systemctl enable --quiet firerunner.service && changed "enabled firerunner.service"; }
	if [ -s "$CONFDIR/.gitlab_token" ]; then
		if ! systemctl is-active --quiet firerunner.service; then
			systemctl start firerunner.service && changed "started firerunner.service"
		elif [ "$UNIT_CHANGED" != 0 ]; then
			systemctl restart firerunner.service
		fi
	fi
elif [ $ON_HOST = 1 ]; then
	say "systemd is not running (no /run/systemd/system): start it by hand: $BINDIR/firerunner serve --config $CONFDIR/config.yaml"
fi

# ---------------------------------------------------------------- next steps

if [ ! -s "$(R "$CONFDIR/.gitlab_token")" ]; then
	cat <<EOF

Next steps:
 1. Create a GitLab access token with scopes create_runner, manage_runner and read_api
    (or api), then store it:   install -m 600 /dev/stdin $CONFDIR/.gitlab_token   (paste, Ctrl-D)
 2. Check gitlab.url in $CONFDIR/config.yaml.
 3. In GitLab: Settings > Webhooks > URL http://<this host>${LISTEN}/webhook, trigger "Job events",
    secret token = the content of $CONFDIR/.webhook_secret
 4. systemctl enable --now firerunner   (then: firerunner doctor)
EOF
fi

if [ $CHANGED = 0 ]; then say "nothing to do: already installed"; else say "$CHANGED change(s) made"; fi

if [ $RUN_DOCTOR = 1 ] && [ $ON_HOST = 1 ]; then
	echo
	"$BINDIR/firerunner" doctor --config "$CONFDIR/config.yaml" || say "doctor reported problems: fix them and run: firerunner doctor"
fi
