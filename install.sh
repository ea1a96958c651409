#!/bin/sh
# shellcheck shell=dash
#
# install.sh: install synchook, the guest agent for Xen Orchestra's VM sync hook,
# as a service that runs now and after every reboot.
#
#   curl -fsSL "$BASE/install.sh" | SYNCHOOK_BASE_URL="$BASE" sh -s -- \
#       --sync 'fsfreeze -f /data' --post-sync 'fsfreeze -u /data'
#   sh install.sh --sync '...'          # offline: synchook.py beside install.sh
#
# POSIX sh (dash, busybox ash). Everything is in functions and the last line calls
# main: a download cut short defines functions and runs nothing.
#
# Every option also reads an environment variable (handy from cloud-init):
#   --from URL|FILE        SYNCHOOK_FROM        where synchook.py comes from
#                          SYNCHOOK_BASE_URL    base URL for <base>/synchook.py when
#                                               install.sh was piped in
#   --sha256 HASH          SYNCHOOK_SHA256      refuse a synchook.py with another hash
#   --prefix DIR           SYNCHOOK_PREFIX      program in DIR/sbin (default /usr/local)
#   --init KIND            SYNCHOOK_INIT        systemd|openrc|sysv|rc.local|none
#   --root DIR             SYNCHOOK_ROOT        install into DIR as if it were /
#   --no-start             SYNCHOOK_NO_START=1  install, do not start
#   --dry-run              SYNCHOOK_DRY_RUN=1   print every action, change nothing
#   --uninstall            SYNCHOOK_UNINSTALL=1 stop and remove service and program
#   --purge                SYNCHOOK_PURGE=1     --uninstall, plus config and state
# and every daemon setting, written to /etc/synchook.conf:
#   --sync CMD             SYNCHOOK_SYNC           and so on for --post-sync,
#   --hold, --hooks-dir, --timeout, --max-hold, --listen, --port, --tls, --tls-cert,
#   --tls-key, --secret, --secret-file, --allow, --header-timeout,
#   --max-connections, --runtime-dir, --state-dir, --log-level
#   (SYNCHOOK_<NAME IN CAPITALS>).

# Daemon settings install.sh writes to the config (tests check this matches synchook.py).
DAEMON_OPTIONS="sync post-sync hold hooks-dir timeout max-hold listen port tls tls-cert
tls-key secret secret-file allow header-timeout max-connections runtime-dir state-dir log-level"
DEFAULT_BASE_URL=""            # set when the project is published at a fixed place
CONFIG_FILE=/etc/synchook.conf
SERVICE=synchook

info() { printf 'info: %s\n' "$*" >&2; }
warn() { printf 'warn: %s\n' "$*" >&2; }
fatal() { printf 'error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<'EOF'
Usage: install.sh [options]

Installs synchook as a service, running now and at every boot.

  --from URL|FILE      synchook.py to install (default: beside install.sh, else
                       $SYNCHOOK_BASE_URL/synchook.py)
  --sha256 HASH        refuse to install a synchook.py with another SHA-256
  --prefix DIR         program goes to DIR/sbin/synchook (default /usr/local)
  --init KIND          systemd, openrc, sysv, rc.local or none (default: detected)
  --root DIR           install into DIR as if it were / (implies --no-start)
  --no-start           do not start or restart the service
  --dry-run            print every action, change nothing
  --uninstall          stop and remove the service and the program
  --purge              --uninstall, and remove /etc/synchook.conf and the state dir
  -h, --help           this help

Daemon settings (written to /etc/synchook.conf, mode 0600; given any of them and
the file is rewritten from them, given none and an existing file is kept):
  --sync CMD  --post-sync CMD  --hold CMD  --hooks-dir DIR  --timeout SEC
  --max-hold SEC  --listen ADDR  --port N  --tls auto|on|off  --tls-cert PATH
  --tls-key PATH  --secret S  --secret-file PATH  --allow LIST
  --header-timeout SEC  --max-connections N  --runtime-dir DIR  --state-dir DIR
  --log-level LEVEL

Every option also reads a variable: SYNCHOOK_FROM, SYNCHOOK_SHA256, SYNCHOOK_PREFIX,
SYNCHOOK_INIT, SYNCHOOK_ROOT, SYNCHOOK_NO_START=1, SYNCHOOK_DRY_RUN=1,
SYNCHOOK_UNINSTALL=1, SYNCHOOK_PURGE=1, and SYNCHOOK_SYNC, SYNCHOOK_POST_SYNC, ...
for the daemon settings (the option name in capitals, dashes as underscores).
EOF
}

# --- small helpers ---------------------------------------------------------

# The one switch for --dry-run: every change goes through here.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf 'dry-run: would run:' >&2
        printf ' %s' "$@" >&2
        printf '\n' >&2
        return 0
    fi
    "$@"
}

# write_file PATH MODE: content from stdin, written atomically.
write_file() {
    if [ "$DRY_RUN" = 1 ]; then
        cat >/dev/null
        printf 'dry-run: would write %s (mode %s)\n' "$1" "$2" >&2
        return 0
    fi
    mkdir -p "$(dirname "$1")" || fatal "cannot create $(dirname "$1")"
    cat >"$1.tmp.$$" || fatal "cannot write $1"
    if ! chmod "$2" "$1.tmp.$$" || ! mv -f "$1.tmp.$$" "$1"; then
        rm -f "$1.tmp.$$"
        fatal "cannot install $1"
    fi
}

have() { command -v "$1" >/dev/null 2>&1; }

# sh single quotes that survive anything: ' " $ \ ` and newlines, trailing ones too.
quote() {
    quote_v=$(printf '%sx' "$1" | sed "s/'/'\\\\''/g")
    printf "'%s'" "${quote_v%x}"
}

option_var() {
    printf 'SYNCHOOK_%s' "$(printf '%s' "$1" | tr 'a-z-' 'A-Z_')"
}

checksum() {
    if have sha256sum; then
        sha256sum "$1" | cut -d' ' -f1
    elif have shasum; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
    fi
}

# A fingerprint of everything installed, to restart only when something changed.
fingerprint() {
    for fingerprint_f in "$PROGRAM" "$ROOT$CONFIG_FILE" "$(service_file)"; do
        [ -f "$fingerprint_f" ] && checksum "$fingerprint_f"
    done
    return 0
}

# --- options ---------------------------------------------------------------

parse_args() {
    FROM=${SYNCHOOK_FROM:-}
    SHA256=${SYNCHOOK_SHA256:-}
    PREFIX=${SYNCHOOK_PREFIX:-/usr/local}
    INIT=${SYNCHOOK_INIT:-}
    ROOT=${SYNCHOOK_ROOT:-}
    NO_START=${SYNCHOOK_NO_START:-0}
    DRY_RUN=${SYNCHOOK_DRY_RUN:-0}
    UNINSTALL=${SYNCHOOK_UNINSTALL:-0}
    PURGE=${SYNCHOOK_PURGE:-0}
    SETTINGS_GIVEN=0
    for parse_name in $DAEMON_OPTIONS; do
        parse_var=$(option_var "$parse_name")
        if eval "[ -n \"\${$parse_var+set}\" ]"; then
            parse_value=""
            eval "parse_value=\$$parse_var"
            add_setting "$parse_name" "$parse_value"
        fi
    done
    while [ $# -gt 0 ]; do
        case $1 in
            -h|--help) usage; exit 0 ;;
            --from) need_value "$@"; FROM=$2; shift ;;
            --sha256) need_value "$@"; SHA256=$2; shift ;;
            --prefix) need_value "$@"; PREFIX=$2; shift ;;
            --init) need_value "$@"; INIT=$2; shift ;;
            --root) need_value "$@"; ROOT=$2; shift ;;
            --no-start) NO_START=1 ;;
            --dry-run) DRY_RUN=1 ;;
            --uninstall) UNINSTALL=1 ;;
            --purge) PURGE=1; UNINSTALL=1 ;;
            --*=*) fatal "write '${1%%=*} VALUE', not '$1'" ;;
            --*)
                is_daemon_option "${1#--}" || fatal "unknown option $1 (see --help)"
                need_value "$@"
                add_setting "${1#--}" "$2"
                shift ;;
            *) fatal "unexpected argument '$1' (see --help)" ;;
        esac
        shift
    done
    [ "$PURGE" = 1 ] && UNINSTALL=1
    ROOT=${ROOT%/}
    [ -n "$ROOT" ] && NO_START=1
    case $INIT in ""|systemd|openrc|sysv|rc.local|none) ;;
        *) fatal "--init $INIT: must be systemd, openrc, sysv, rc.local or none" ;; esac
    case $SHA256 in ""|*[!0-9a-fA-F]*) [ -z "$SHA256" ] || fatal "--sha256: not a hex SHA-256" ;; esac
    PROGRAM="$ROOT$PREFIX/sbin/synchook"
}

need_value() {
    [ $# -ge 2 ] || fatal "$1 needs a value"
}

# add_setting NAME VALUE: remember one daemon setting (a later one wins).
add_setting() {
    add_var=$(option_var "$1")
    eval "SETTING_$add_var=\$2"
    SETTINGS_GIVEN=1
    case $1 in timeout) TIMEOUT=$2 ;; port) PORT=$2 ;; esac
}

# The config lines, one per setting given, in a fixed order.
settings_text() {
    for settings_name in $DAEMON_OPTIONS; do
        settings_var=$(option_var "$settings_name")
        if eval "[ -n \"\${SETTING_$settings_var+set}\" ]"; then
            settings_value=""
            eval "settings_value=\$SETTING_$settings_var"
            printf '%s=%s\n' "$settings_var" "$(quote "$settings_value")"
        fi
    done
}

is_daemon_option() {
    for is_name in $DAEMON_OPTIONS; do
        [ "$is_name" = "$1" ] && return 0
    done
    return 1
}

# --- what is there ---------------------------------------------------------

find_python() {
    for find_py in python3 python3.13 python3.12 python3.11 python3.10 python3.9 \
                   python3.8 python3.7 python3.6 /usr/libexec/platform-python; do
        if have "$find_py" && "$find_py" -c 'import sys; sys.exit(sys.version_info < (3, 6))' \
                2>/dev/null; then
            # The real binary, not a wrapper such as a pyenv shim.
            PYTHON=$("$find_py" -c 'import sys; print(sys.executable)') && [ -n "$PYTHON" ] \
                && return 0
        fi
    done
    fatal "synchook needs Python 3.6 or newer, and none was found. Install it with:
  Debian/Ubuntu:     apt-get install -y python3
  RHEL/Alma/Rocky:   dnf install -y python3   (RHEL 7: yum install -y python3)
  Alpine:            apk add python3
  SUSE:              zypper install -y python3"
}

detect_init() {
    [ -n "$INIT" ] && return 0
    if [ -d "$ROOT/run/systemd/system" ]; then
        INIT=systemd            # sd_booted(3): systemd is PID 1
    elif have openrc-run || [ -x "$ROOT/sbin/openrc-run" ]; then
        INIT=openrc
    elif [ -d "$ROOT/etc/init.d" ]; then
        INIT=sysv
    else
        INIT=rc.local
    fi
}

# Buildroot and busybox systems run /etc/init.d/S??* from rcS.
sysv_script() {
    if [ -f "$ROOT/etc/init.d/rcS" ] && grep -q 'S\?\?\*' "$ROOT/etc/init.d/rcS" 2>/dev/null; then
        printf '%s' "$ROOT/etc/init.d/S99synchook"
    else
        printf '%s' "$ROOT/etc/init.d/synchook"
    fi
}

service_file() {
    case $INIT in
        systemd) printf '%s' "$ROOT/etc/systemd/system/$SERVICE.service" ;;
        openrc) printf '%s' "$ROOT/etc/init.d/$SERVICE" ;;
        sysv) sysv_script ;;
        rc.local) printf '%s' "$ROOT/etc/rc.local" ;;
        *) printf '' ;;
    esac
}

# --- getting synchook.py ---------------------------------------------------

fetch() {
    if have curl; then
        curl -fsSL --retry 2 -o "$2" "$1"
    elif have wget; then
        wget -q -O "$2" "$1"
    else
        "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$1" "$2"
    fi
}

get_program() {
    if [ -z "$FROM" ]; then
        case $0 in
            */install.sh|install.sh) [ -f "$(dirname "$0")/synchook.py" ] && FROM="$(dirname "$0")/synchook.py" ;;
        esac
    fi
    if [ -z "$FROM" ]; then
        get_base=${SYNCHOOK_BASE_URL:-$DEFAULT_BASE_URL}
        [ -n "$get_base" ] || fatal "where is synchook.py? Give --from URL|FILE, or SYNCHOOK_BASE_URL when install.sh is piped in"
        FROM="${get_base%/}/synchook.py"
    fi
    WORK=$(mktemp -d 2>/dev/null || mktemp -d -t synchook) || fatal "cannot create a temporary directory"
    trap 'rm -rf "$WORK"' EXIT
    case $FROM in
        http://*|https://*)
            info "downloading $FROM"
            fetch "$FROM" "$WORK/synchook.py" || fatal "cannot download $FROM" ;;
        *)
            [ -f "$FROM" ] || fatal "--from $FROM: no such file"
            cp "$FROM" "$WORK/synchook.py" || fatal "cannot read $FROM" ;;
    esac
    if [ -n "$SHA256" ]; then
        get_sum=$(checksum "$WORK/synchook.py")
        [ "$get_sum" = "$(printf '%s' "$SHA256" | tr 'A-F' 'a-f')" ] \
            || fatal "SHA-256 mismatch for $FROM: expected $SHA256, got $get_sum; nothing installed"
    fi
    "$PYTHON" -c 'import ast, sys; ast.parse(open(sys.argv[1], "rb").read())' "$WORK/synchook.py" 2>/dev/null \
        || fatal "$FROM is not a Python program (truncated download?); nothing installed"
    VERSION=$("$PYTHON" -I -S "$WORK/synchook.py" --version 2>/dev/null) || VERSION=""
    case $VERSION in
        "synchook "*) ;;
        *) fatal "$FROM does not answer --version with $PYTHON (truncated?); nothing installed" ;;
    esac
}

install_program() {
    { printf '#!%s -IS\n' "$PYTHON"; sed '1{/^#!/d;}' "$WORK/synchook.py"; } | write_file "$PROGRAM" 0755
}

install_config() {
    if [ "$SETTINGS_GIVEN" = 0 ] && [ -f "$ROOT$CONFIG_FILE" ]; then
        info "keeping $CONFIG_FILE (no settings given)"
        return 0
    fi
    [ -f "$ROOT$CONFIG_FILE" ] && info "rewriting $CONFIG_FILE from the settings given"
    {
        printf '# synchook settings, read by synchook --config (parsed with sh quoting, never run).\n'
        printf '# Written by install.sh; see synchook --help for every SYNCHOOK_* name.\n'
        settings_text
    } | write_file "$ROOT$CONFIG_FILE" 0600
}

config_value() {
    [ -f "$ROOT$CONFIG_FILE" ] || return 0
    sed -n "s/^$1='\\([^']*\\)'\$/\\1/p" "$ROOT$CONFIG_FILE" | tail -n 1
}

# --- services --------------------------------------------------------------

daemon_command() {
    printf '%s -I -S %s --config %s' "$PYTHON" "$PREFIX/sbin/synchook" "$CONFIG_FILE"
}

systemd_unit() {
    stop_timeout=$(( ${TIMEOUT_INT:-55} * 2 + 30 ))
    cat <<EOF
[Unit]
Description=synchook: Xen Orchestra VM sync hook agent
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
ExecStart=$(daemon_command)
Restart=on-failure
RestartSec=2
# On stop synchook lets a running hook finish, then runs the post command if a
# window is open: give it longer than two hook timeouts. KillMode=mixed sends
# SIGTERM to synchook alone, so a running post command is not killed under it.
TimeoutStopSec=$stop_timeout
KillMode=mixed
# Hardening that leaves the real mounts visible: hooks run fsfreeze, which needs
# CAP_SYS_ADMIN and the very mounts ProtectSystem, ProtectHome, PrivateTmp,
# PrivateMounts or PrivateDevices would hide or replace (see fstrim.service).
ProtectKernelTunables=yes
ProtectControlGroups=yes
ProtectClock=yes

[Install]
WantedBy=multi-user.target
EOF
}

openrc_script() {
    cat <<EOF
#!/sbin/openrc-run
# synchook: Xen Orchestra VM sync hook agent (written by install.sh)
name="synchook"
description="Xen Orchestra VM sync hook agent"
command="$PYTHON"
command_args="-I -S $PREFIX/sbin/synchook --config $CONFIG_FILE --syslog"
supervisor=supervise-daemon
pidfile="/run/\${RC_SVCNAME}.pid"
respawn_delay=2
# let a running hook and the post command finish before SIGKILL
retry="TERM/$(( ${TIMEOUT_INT:-55} * 2 + 30 ))/KILL/5"

depend() {
    need net
    use logger
}
EOF
}

sysv_script_text() {
    cat <<EOF
#!/bin/sh
### BEGIN INIT INFO
# Provides:          synchook
# Required-Start:    \$network \$remote_fs \$syslog
# Required-Stop:     \$network \$remote_fs \$syslog
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: Xen Orchestra VM sync hook agent
### END INIT INFO
# chkconfig: 2345 90 10
# description: Xen Orchestra VM sync hook agent (written by install.sh)

PYTHON="$PYTHON"
PROGRAM="$PREFIX/sbin/synchook"
CONFIG="$CONFIG_FILE"
PIDFILE=/run/synchook.pid
STOP_WAIT=$(( ${TIMEOUT_INT:-55} * 2 + 30 ))

running() {
    [ -f "\$PIDFILE" ] && kill -0 "\$(cat "\$PIDFILE")" 2>/dev/null
}

start() {
    if running; then echo "synchook is already running"; return 0; fi
    "\$PYTHON" -I -S "\$PROGRAM" --config "\$CONFIG" --syslog </dev/null >/dev/null 2>&1 &
    echo \$! > "\$PIDFILE"
    sleep 1
    if running; then echo "synchook started"; else echo "synchook failed to start (see syslog)"; return 1; fi
}

stop() {
    if ! running; then echo "synchook is not running"; rm -f "\$PIDFILE"; return 0; fi
    pid=\$(cat "\$PIDFILE")
    kill -TERM "\$pid"
    waited=0
    while kill -0 "\$pid" 2>/dev/null && [ \$waited -lt \$STOP_WAIT ]; do
        sleep 1; waited=\$((waited + 1))
    done
    kill -0 "\$pid" 2>/dev/null && kill -KILL "\$pid"
    rm -f "\$PIDFILE"
    echo "synchook stopped"
}

case "\$1" in
    start) start ;;
    stop) stop ;;
    restart|force-reload) stop; start ;;
    status)
        if running; then echo "synchook is running (pid \$(cat "\$PIDFILE"))"; exit 0; fi
        echo "synchook is not running"; exit 3 ;;
    *) echo "Usage: \$0 {start|stop|restart|status}"; exit 2 ;;
esac
EOF
}

RC_BEGIN="# BEGIN synchook (managed by install.sh; removed by install.sh --uninstall)"
RC_END="# END synchook"

rc_local_block() {
    printf '%s\n%s --syslog </dev/null >/dev/null 2>&1 &\necho $! > /run/synchook.pid\n%s\n' \
        "$RC_BEGIN" "$(daemon_command)" "$RC_END"
}

# rc.local without our block (also used by --uninstall).
rc_local_without_block() {
    sed "/^# BEGIN synchook /,/^# END synchook\$/d" "$ROOT/etc/rc.local"
}

install_rc_local() {
    rc_file="$ROOT/etc/rc.local"
    if [ -f "$rc_file" ]; then
        rc_body=$(rc_local_without_block)
    else
        rc_body='#!/bin/sh'
    fi
    # Our block goes before a final "exit 0", where rc.local has one.
    rc_last=$(printf '%s\n' "$rc_body" | tail -n 1)
    if [ "$rc_last" = "exit 0" ]; then
        rc_body=$(printf '%s\n' "$rc_body" | sed '$d')
        { printf '%s\n' "$rc_body"; rc_local_block; printf 'exit 0\n'; } | write_file "$rc_file" 0755
    else
        { printf '%s\n' "$rc_body"; rc_local_block; } | write_file "$rc_file" 0755
    fi
}

install_service() {
    TIMEOUT_INT=$(printf '%s' "${TIMEOUT:-$(config_value SYNCHOOK_TIMEOUT)}" | sed 's/\..*//')
    case $TIMEOUT_INT in ''|*[!0-9]*) TIMEOUT_INT=55 ;; esac
    case $INIT in
        systemd)
            systemd_unit | write_file "$(service_file)" 0644
            if [ -n "$ROOT" ]; then
                run mkdir -p "$ROOT/etc/systemd/system/multi-user.target.wants"
                run ln -sf "/etc/systemd/system/$SERVICE.service" \
                    "$ROOT/etc/systemd/system/multi-user.target.wants/$SERVICE.service"
            else
                run systemctl daemon-reload
                run systemctl enable "$SERVICE" >/dev/null 2>&1 || warn "systemctl enable failed"
            fi ;;
        openrc)
            openrc_script | write_file "$(service_file)" 0755
            if [ -n "$ROOT" ]; then
                run mkdir -p "$ROOT/etc/runlevels/default"
                run ln -sf "/etc/init.d/$SERVICE" "$ROOT/etc/runlevels/default/$SERVICE"
            else
                run rc-update add "$SERVICE" default >/dev/null || warn "rc-update add failed"
            fi ;;
        sysv)
            sysv_script_text | write_file "$(sysv_script)" 0755
            enable_sysv ;;
        rc.local)
            install_rc_local ;;
        none) info "no service set up (--init none)" ;;
    esac
}

enable_sysv() {
    case $(sysv_script) in */S99synchook) return 0 ;; esac     # rcS runs it
    if [ -n "$ROOT" ]; then
        for enable_level in 2 3 4 5; do
            [ -d "$ROOT/etc/rc$enable_level.d" ] && run ln -sf ../init.d/synchook "$ROOT/etc/rc$enable_level.d/S90synchook"
        done
        for enable_level in 0 1 6; do
            [ -d "$ROOT/etc/rc$enable_level.d" ] && run ln -sf ../init.d/synchook "$ROOT/etc/rc$enable_level.d/K10synchook"
        done
        return 0
    fi
    if have update-rc.d; then
        run update-rc.d synchook defaults >/dev/null
    elif have chkconfig; then
        run chkconfig --add synchook
    elif have rc-update; then
        run rc-update add synchook default
    else
        warn "no update-rc.d, chkconfig or rc-update: start /etc/init.d/synchook at boot yourself"
    fi
}

start_service() {
    case $INIT in
        systemd) run systemctl restart "$SERVICE" ;;
        openrc) run rc-service "$SERVICE" restart ;;
        sysv) run "$(sysv_script)" restart ;;
        rc.local)
            stop_rc_local
            run sh -c "$(daemon_command) --syslog </dev/null >/dev/null 2>&1 & echo \$! > /run/synchook.pid" ;;
        none) return 0 ;;
    esac
}

stop_rc_local() {
    if [ -f /run/synchook.pid ] && kill -0 "$(cat /run/synchook.pid)" 2>/dev/null; then
        run kill -TERM "$(cat /run/synchook.pid)"
        stop_waited=0
        while [ "$DRY_RUN" != 1 ] && kill -0 "$(cat /run/synchook.pid)" 2>/dev/null \
                && [ $stop_waited -lt 150 ]; do
            sleep 1; stop_waited=$((stop_waited + 1))
        done
    fi
}

# Does the port take connections?  (A TCP connect, never a /sync.)  $1: tries
check_listening() {
    check_max=${1:-20}
    check_port=${PORT:-$(config_value SYNCHOOK_PORT)}
    check_port=${check_port:-1727}
    check_host=$(config_value SYNCHOOK_LISTEN)
    case $check_host in ""|"::"|"0.0.0.0") check_host=127.0.0.1 ;; esac
    check_tries=0
    while [ $check_tries -lt "$check_max" ]; do
        if "$PYTHON" -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).close()' \
                "$check_host" "$check_port" 2>/dev/null; then
            info "synchook is listening on port $check_port"
            return 0
        fi
        sleep 0.5 2>/dev/null || sleep 1
        check_tries=$((check_tries + 1))
    done
    warn "synchook does not answer on port $check_port yet: check the logs ($(log_hint))"
    return 1
}

log_hint() {
    case $INIT in
        systemd) printf 'journalctl -u synchook' ;;
        openrc|sysv|rc.local) printf 'syslog: /var/log/messages, /var/log/syslog or logread' ;;
        *) printf 'stderr of synchook' ;;
    esac
}

summary() {
    summary_port=${PORT:-$(config_value SYNCHOOK_PORT)}
    summary_tls=$(config_value SYNCHOOK_TLS)
    if grep -q '^SYNCHOOK_SECRET' "$ROOT$CONFIG_FILE" 2>/dev/null; then
        summary_tag="xo:notify-on-snapshot=https://<VM address>:${summary_port:-1727}/?token=<your secret>"
    elif [ "${summary_port:-1727}" = 1727 ] && [ "$summary_tls" != off ]; then
        summary_tag="xo:notify-on-snapshot"
    elif [ "$summary_tls" = off ]; then
        summary_tag="xo:notify-on-snapshot=http://<VM address>:${summary_port:-1727}/"
    else
        summary_tag="xo:notify-on-snapshot=https://<VM address>:$summary_port/"
    fi
    summary_what="installed"
    [ "$DRY_RUN" = 1 ] && summary_what="would be installed (dry run: nothing changed)"
    cat <<EOF

synchook $summary_what ($VERSION)
  program:  $PROGRAM (Python: $PYTHON)
  config:   $ROOT$CONFIG_FILE (mode 0600; change it, then restart the service)
  service:  $INIT${ROOT:+ (in $ROOT, not started)}
  logs:     $(log_hint)
  XO tag:   $summary_tag
  try it:   $PREFIX/sbin/synchook check --config $CONFIG_FILE
EOF
}

# --- uninstall -------------------------------------------------------------

# The program a service file runs (it may have been installed with another --prefix).
installed_program() {
    for installed_file in "$ROOT/etc/systemd/system/$SERVICE.service" "$ROOT/etc/init.d/synchook" \
            "$ROOT/etc/init.d/S99synchook" "$ROOT/etc/rc.local"; do
        [ -f "$installed_file" ] || continue
        installed_path=$(grep -o '[^ "=]*/sbin/synchook' "$installed_file" | head -n 1)
        if [ -n "$installed_path" ]; then
            printf '%s' "$ROOT$installed_path"
            return 0
        fi
    done
}

uninstall() {
    uninstall_program=$(installed_program)
    if [ -z "$ROOT" ]; then
        if have systemctl && [ -f "/etc/systemd/system/$SERVICE.service" ]; then
            run systemctl disable --now "$SERVICE" >/dev/null 2>&1
        fi
        if have rc-service && [ -f "/etc/init.d/$SERVICE" ] && head -n 1 "/etc/init.d/$SERVICE" | grep -q openrc-run; then
            run rc-service "$SERVICE" stop
            run rc-update del "$SERVICE" default >/dev/null 2>&1
        fi
        for uninstall_script in /etc/init.d/synchook /etc/init.d/S99synchook; do
            if [ -f "$uninstall_script" ] && grep -q 'BEGIN INIT INFO' "$uninstall_script"; then
                run "$uninstall_script" stop
            fi
        done
        if have update-rc.d && [ -f /etc/init.d/synchook ]; then
            run update-rc.d -f synchook remove >/dev/null 2>&1
        elif have chkconfig && [ -f /etc/init.d/synchook ]; then
            run chkconfig --del synchook
        fi
        stop_rc_local
        [ -f /run/synchook.pid ] && run rm -f /run/synchook.pid
    fi
    for uninstall_file in "$ROOT/etc/systemd/system/$SERVICE.service" \
            "$ROOT/etc/systemd/system/multi-user.target.wants/$SERVICE.service" \
            "$ROOT/etc/init.d/synchook" "$ROOT/etc/init.d/S99synchook" \
            "$ROOT/etc/runlevels/default/synchook" \
            "$ROOT"/etc/rc?.d/[SK][0-9][0-9]synchook "$PROGRAM" "$uninstall_program"; do
        if [ -f "$uninstall_file" ] || [ -L "$uninstall_file" ]; then
            run rm -f "$uninstall_file"
        fi
    done
    if [ -f "$ROOT/etc/rc.local" ] && grep -q '^# BEGIN synchook ' "$ROOT/etc/rc.local"; then
        if [ "$(rc_local_without_block | sed '/^[[:space:]]*$/d')" = '#!/bin/sh' ]; then
            run rm -f "$ROOT/etc/rc.local"          # we made it; nothing else is in it
        else
            rc_local_without_block | write_file "$ROOT/etc/rc.local" 0755
        fi
    fi
    if [ -z "$ROOT" ] && have systemctl && [ -d /run/systemd/system ]; then
        run systemctl daemon-reload
    fi
    if [ "$PURGE" = 1 ]; then
        uninstall_state=$(config_value SYNCHOOK_STATE_DIR)
        uninstall_state=${uninstall_state:-/var/lib/synchook}
        run rm -rf "$ROOT$CONFIG_FILE" "$ROOT$uninstall_state"
        info "removed synchook, its configuration and $uninstall_state"
    else
        info "removed synchook (kept $CONFIG_FILE; --purge removes it)"
    fi
}

# --- main ------------------------------------------------------------------

main() {
    parse_args "$@"
    if [ "$DRY_RUN" != 1 ] && [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
        fatal "run install.sh as root (or with --root DIR to install into a directory)"
    fi
    if [ "$UNINSTALL" = 1 ]; then
        uninstall
        return 0
    fi
    find_python
    detect_init
    get_program
    before=$(fingerprint)
    install_program
    install_config
    install_service
    after=$(fingerprint)
    if [ "$NO_START" != 1 ] && [ "$DRY_RUN" = 1 ] && [ "$INIT" != none ]; then
        start_service                      # prints what it would run
    elif [ "$NO_START" != 1 ] && [ "$INIT" != none ]; then
        if [ "$before" != "$after" ] || ! check_listening_quietly; then
            start_service
        else
            info "nothing changed: service left running"
        fi
        check_listening
    fi
    summary
}

check_listening_quietly() {
    check_listening 1 >/dev/null 2>&1
}

main "$@"
