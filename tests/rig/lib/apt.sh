# shellcheck shell=bash
# Shared APT helpers for the rig setup scripts (sourced, not run).
#
#   rig_apt_retry ARGS...          apt-get ARGS, waiting out the dpkg lock and transient mirror errors
#   rig_apt_update_once            apt-get update, once per run
#   rig_apt_ensure_backports       add <codename>-backports (same mirror) to the host sources if absent
#   rig_apt_install_tools [-b] CMD:PKG...
#                                  install PKG for every CMD not on PATH, or every /absolute/file
#                                  CMD that does not exist (-b: from backports)
#   rig_apt_private DIR ARCH [EXTRA_ARCH]
#                                  a private APT configuration in DIR (own sources, lists, cache and
#                                  dpkg status) whose native architecture is ARCH; it never touches
#                                  the host's dpkg. Prints the apt.conf path, to use as APT_CONFIG.
#
# The caller sets RIG_APT_TAG (log prefix) before sourcing; messages go to stderr.

RIG_APT_TAG=${RIG_APT_TAG:-rig-apt}
RIG_APT_UPDATED=0
export DEBIAN_FRONTEND=noninteractive

_rig_apt_log() { echo "[$RIG_APT_TAG] $*" >&2; }
_rig_apt_die() {
    echo "[$RIG_APT_TAG] error: $*" >&2
    exit 1
}

RIG_APT_CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$RIG_APT_CODENAME" ] || _rig_apt_die "cannot tell the Debian codename from /etc/os-release"

# Retries cover a busy dpkg lock or mirror, not a wrong package name: few of them.
rig_apt_retry() {
    local n
    for n in $(seq 1 5); do
        if apt-get -q -o DPkg::Lock::Timeout=120 "$@" >&2; then return 0; fi
        _rig_apt_log "apt-get $* failed (try $n), retrying in 10 s"
        sleep 10
    done
    _rig_apt_die "apt-get $* kept failing"
}

rig_apt_update_once() {
    [ "$RIG_APT_UPDATED" = 1 ] && return 0
    rig_apt_retry update
    RIG_APT_UPDATED=1
}

# The Debian mirror this machine already uses for the release suite (deb822 first, then one-line).
rig_apt_mirror() {
    local f uri=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk -v suite="$RIG_APT_CODENAME" '
            BEGIN { RS = ""; FS = "\n" }
            {
                uris = ""; suites = ""
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
                    if ($i ~ /^Suites:/) { suites = " " $i " " }
                }
                if (uris != "" && suites ~ (" " suite " ")) { split(uris, u, /[ \t]+/); print u[1]; exit }
            }' "$f")
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk -v suite="$RIG_APT_CODENAME" '$1 == "deb" {
                i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit } }' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || _rig_apt_die "no Debian mirror for $RIG_APT_CODENAME found in the APT sources"
    echo "$uri"
}

_rig_apt_backports_stanza() {
    printf 'Types: deb\nURIs: %s\nSuites: %s-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$(rig_apt_mirror)" "$RIG_APT_CODENAME"
}

rig_apt_ensure_backports() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && grep -qE "^[^#]*[[:space:]]$RIG_APT_CODENAME-backports([[:space:]]|$)" "$f" && return 0
    done
    _rig_apt_log "adding $RIG_APT_CODENAME-backports to the APT sources"
    _rig_apt_backports_stanza > "/etc/apt/sources.list.d/$RIG_APT_CODENAME-backports.sources"
    RIG_APT_UPDATED=0
}

_rig_apt_have() {
    case $1 in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
    esac
}

rig_apt_install_tools() {
    local from=() t missing=""
    if [ "${1:-}" = -b ]; then
        from=(-t "$RIG_APT_CODENAME-backports")
        shift
        rig_apt_ensure_backports
    fi
    for t in "$@"; do
        _rig_apt_have "${t%%:*}" || missing="$missing ${t#*:}"
    done
    [ -n "$missing" ] || return 0
    _rig_apt_log "installing host packages${from[*]:+ (${from[*]})}:$missing"
    rig_apt_update_once
    # shellcheck disable=SC2086
    rig_apt_retry install -y --no-install-recommends "${from[@]}" $missing
    for t in "$@"; do
        _rig_apt_have "${t%%:*}" || _rig_apt_die "${t%%:*} still missing after installing ${t#*:}"
    done
}

rig_apt_private() {
    local dir=$1 arch=$2 archs="\"$2\";"
    [ -n "${3:-}" ] && archs="$archs \"$3\";"
    mkdir -p "$dir/state/lists/partial" "$dir/cache/archives/partial" "$dir/sources"
    touch "$dir/status"
    rm -f "$dir/sources/"*
    cp /etc/apt/sources.list.d/*.sources "$dir/sources/" 2>/dev/null || true
    [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$dir/sources/host.list"
    grep -rqs -- "$RIG_APT_CODENAME-backports" "$dir/sources" || _rig_apt_backports_stanza > "$dir/sources/backports.sources"
    cat > "$dir/apt.conf" <<EOF
Dir::State "$dir/state";
Dir::State::status "$dir/status";
Dir::Cache "$dir/cache";
Dir::Etc::sourceparts "$dir/sources";
Dir::Etc::sourcelist "/dev/null";
APT::Architecture "$arch";
APT::Architectures { $archs };
APT::Sandbox::User "root";
EOF
    echo "$dir/apt.conf"
}
