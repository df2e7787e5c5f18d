#!/usr/bin/env bash
# Installs the system packages Weft's tests and benchmarks need, and only those that are missing.
# Idempotent: each package is checked by a command it provides, never re-installed.
# Needs root (or everything already present). Prints one summary line.
set -euo pipefail

# iptables, ip and setpriv live in sbin, which is not on a non-root user's PATH on Debian.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# command it provides  ->  Debian package
checks=(
  "iptables-nft:iptables"
  "ip6tables-nft:iptables"
  "iptables-nft-restore:iptables"
  "iptables-legacy-restore:iptables"
  "ip6tables-legacy-restore:iptables"
  "ip:iproute2"
  "curl:curl"
  "openssl:openssl"
  "promtool:prometheus"
  "prometheus:prometheus"
  "haproxy:haproxy"
  "setpriv:util-linux"
  "pkill:procps"
  "python3:python3"
  # The eBPF datapath (cni/bpf/*.c): Debian's clang with -target bpf and libbpf's headers.
  "clang:clang"
  "/usr/include/bpf/bpf_helpers.h:libbpf-dev"
  "bpftool:bpftool"
  # The CNI plugin's tests delegate addresses to the reference host-local IPAM plugin.
  "/usr/lib/cni/host-local:containernetworking-plugins"
  "iperf3:iperf3"
)

missing=()
for entry in "${checks[@]}"; do
  cmd="${entry%%:*}"
  pkg="${entry#*:}"
  # An entry is either a command on PATH or an absolute path to a file the package installs.
  if { [[ "$cmd" == /* ]] && [ ! -e "$cmd" ]; } || { [[ "$cmd" != /* ]] && ! command -v "$cmd" >/dev/null 2>&1; }; then
    case " ${missing[*]-} " in
      *" $pkg "*) ;;
      *) missing+=("$pkg") ;;
    esac
  fi
done

# Python packages (pip), checked by an import: helm-sdkpy bundles Helm's Go library and runs
# Helm's linter and renderer for tests/tests/chart.rs (tests/chart/helm.py); PyYAML reads the
# chart's values there. helm-sdkpy declares a newer Python than it needs, hence
# --ignore-requires-python. Runs after the system packages (python3 may come from them).
python_packages() {
  local wanted=()
  python3 -c "import helm_sdkpy" >/dev/null 2>&1 || wanted+=("helm-sdkpy")
  python3 -c "import yaml" >/dev/null 2>&1 || wanted+=("pyyaml")
  [ "${#wanted[@]}" -eq 0 ] && return 0
  if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "setup: missing Python packages: ${wanted[*]}; pip not found (install python3-pip)" >&2
    return 1
  fi
  local plog
  plog="$(mktemp)"
  if ! python3 -m pip install -q --ignore-requires-python "${wanted[@]}" >"$plog" 2>&1 \
    && ! python3 -m pip install -q --ignore-requires-python --break-system-packages "${wanted[@]}" >"$plog" 2>&1; then
    cat "$plog" >&2
    rm -f "$plog"
    echo "setup: pip failed installing: ${wanted[*]}" >&2
    return 1
  fi
  rm -f "$plog"
  echo "setup: installed Python packages ${wanted[*]}"
}

if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup: all system packages present"
  python_packages
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: missing packages: ${missing[*]}; run scripts/setup.sh as root or install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: missing packages: ${missing[*]}; apt-get not found, install them with this system's package manager" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "setup: apt-get failed installing: ${missing[*]}" >&2
  exit 1
fi
echo "setup: installed ${missing[*]}"
python_packages
