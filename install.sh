#!/bin/sh
# shellcheck shell=dash
# A download cut short must fail, not succeed having done nothing (cloud-init would
# record a success): main sets MAIN_DONE as it ends, and this trap, the first command
# of the file, turns any other end into exit 1, with one message whether the cut
# fell between two functions (the shell reads to the end and exits 0) or inside
# one (a syntax error, exit 2) or inside a word (a command not found, 127); fatal's
# own exits are not cuts.  It also removes the work directory.
# shellcheck disable=SC2154
trap 'exit_status=$?; [ -n "${WORK:-}" ] && rm -rf "$WORK"; if [ "${MAIN_DONE:-0}" != 1 ] && [ "${FATAL:-0}" != 1 ] && { [ "$exit_status" = 0 ] || [ "$exit_status" = 2 ] || [ "$exit_status" = 127 ]; }; then printf "error: install.sh ended before its last line (a cut download?): nothing was done\n" >&2; exit 1; fi' EXIT
#
# install.sh: install synchook, the guest agent for Xen Orchestra's VM sync hook,
# as a service that runs now and after every reboot.
#
#   curl -fsSL "$BASE/install.sh" | SYNCHOOK_BASE_URL="$BASE" sh -s -- \
#       --sync 'fsfreeze -f /data' --post-sync 'fsfreeze -u /data'
#   sh install.sh --sync '...'          # offline: synchook.py beside install.sh
#
# POSIX sh (dash, busybox ash). Everything is in functions and the last line calls
# main: a download cut short defines functions, runs nothing, and exits 1.
#
# Every option also reads an environment variable (handy from cloud-init):
#   --from URL|FILE        SYNCHOOK_FROM        where synchook.py comes from
#                          SYNCHOOK_BASE_URL    base URL for <base>/synchook.py when
#                                               install.sh was piped in
#   --sha256 HASH          SYNCHOOK_SHA256      refuse a synchook.py with another hash
#   --prefix DIR           SYNCHOOK_PREFIX      program in DIR/sbin (default /usr/local)
#   --init KIND            SYNCHOOK_INIT        systemd|openrc|sysv|rc.local|none
#   --root DIR             SYNCHOOK_ROOT        install into DIR as if it were /
#   --python PATH          SYNCHOOK_PYTHON      the interpreter, as seen on the target
#   --reset                SYNCHOOK_RESET=1     forget the settings of earlier runs
#   --open-firewall        SYNCHOOK_OPEN_FIREWALL=1 open the port in the active firewall
#   --no-start             SYNCHOOK_NO_START=1  install, do not start
#   --dry-run              SYNCHOOK_DRY_RUN=1   print every action, change nothing
#   --uninstall            SYNCHOOK_UNINSTALL=1 stop and remove service and program
#   --purge                SYNCHOOK_PURGE=1     --uninstall, plus config and state
# and every daemon setting, written to /etc/synchook.conf:
#   --sync CMD             SYNCHOOK_SYNC           and so on for --post-sync,
#   --hold, --hooks-dir, --hook-words, --freeze, --freeze-under,
#   --skip-freeze-on-failure (1 or 0), --timeout, --max-hold, --listen,
#   --port, --tls, --tls-cert,
#   --tls-key, --secret, --secret-file, --allow, --header-timeout,
#   --max-connections, --runtime-dir, --state-dir, --log-level
#   (SYNCHOOK_<NAME IN CAPITALS>).

# Daemon settings install.sh writes to the config (tests check this matches synchook.py).
DAEMON_OPTIONS="sync post-sync hold hooks-dir hook-words freeze freeze-under skip-freeze-on-failure
timeout max-hold listen port tls
tls-cert tls-key secret secret-file allow header-timeout max-connections runtime-dir state-dir
log-level"
INSTALLER_VERSION="1.7.0"      # the synchook release this install.sh comes with
DEFAULT_BASE_URL=""            # set when the project is published at a fixed place
CONFIG_FILE=/etc/synchook.conf
SERVICE=synchook
PID_FILE=/run/synchook.pid
START_LOG=/run/synchook.start   # the daemon's stderr under SysV and rc.local: its start-up lines
FILE_LOG=/var/log/synchook.log  # where --syslog writes when there is no syslog socket
LOGROTATE_FILE=/etc/logrotate.d/synchook
FIREWALL_UNDO=/etc/synchook.firewall   # what --open-firewall opened, to close at --uninstall
RUNTIME_DIR=/run/synchook
ANSWER_WAIT=20                  # seconds a started service has to answer on its port
# Where a Python 3 may be inside an image (--root), first found wins.
ROOT_PYTHONS="usr/bin/python3 usr/local/bin/python3 usr/libexec/platform-python
usr/bin/python3.13 usr/bin/python3.12 usr/bin/python3.11 usr/bin/python3.10 usr/bin/python3.9
usr/bin/python3.8 usr/bin/python3.7 usr/bin/python3.6 bin/python3"

info() { printf 'info: %s\n' "$*" >&2; }
warn() { printf 'warn: %s\n' "$*" >&2; }
fatal() { FATAL=1; printf 'error: %s\n' "$*" >&2; exit 1; }
# A bad option or setting: exit 2, as synchook's own (nothing was done).
usage_error() { FATAL=1; printf 'error: %s\n' "$*" >&2; exit 2; }

usage() {
    cat <<'USAGE'
Usage: install.sh [options]

Installs synchook as a service, running now and at every boot.

  --from URL|FILE      synchook.py to install (default: beside install.sh, else
                       $SYNCHOOK_BASE_URL/synchook.py)
  --sha256 HASH        refuse to install a synchook.py with another SHA-256
  --prefix DIR         program goes to DIR/sbin/synchook (default /usr/local)
  --init KIND          systemd, openrc, sysv, rc.local or none (default: the kind
                       installed before, else detected; pass it when building images)
  --root DIR           install into DIR as if it were / (implies --no-start)
  --python PATH        the Python 3 to run synchook with, as seen on the target
                       (default: found in --root, else on this machine)
  --reset              start the settings from the defaults, not from the last run's
  --unset NAME         drop one setting of the last run's (--unset allow)
  --open-firewall      open the port in the firewall found active (firewalld, ufw,
                       nftables or iptables); never done unless asked
  --no-start           do not start or restart the service
  --dry-run            print every action, change nothing
  --uninstall          stop and remove the service and the program
  --purge              --uninstall, and remove /etc/synchook.conf, the state dir,
                       the runtime dir, the log file and its logrotate entry
  --version            the synchook release this install.sh comes with
  -h, --help           this help

Daemon settings (written to /etc/synchook.conf, mode 0600; a setting not given keeps
the value it had, --reset forgets them all; the new program checks them first):
  --sync CMD  --post-sync CMD  --hold CMD  --hooks-dir DIR  --hook-words SYNC,POST
  --freeze all|MOUNT,...
  --freeze-under DIR  --skip-freeze-on-failure 1|0  --timeout SEC
  --max-hold SEC  --listen ADDR  --port N  --tls auto|on|off  --tls-cert PATH
  --tls-key PATH  --secret S  --secret-file PATH  --allow LIST
  --header-timeout SEC  --max-connections N  --runtime-dir DIR  --state-dir DIR
  --log-level LEVEL

Every option also reads a variable: SYNCHOOK_FROM, SYNCHOOK_SHA256, SYNCHOOK_PREFIX,
SYNCHOOK_INIT, SYNCHOOK_ROOT, SYNCHOOK_PYTHON, SYNCHOOK_RESET=1,
SYNCHOOK_OPEN_FIREWALL=1, SYNCHOOK_NO_START=1,
SYNCHOOK_DRY_RUN=1, SYNCHOOK_UNINSTALL=1, SYNCHOOK_PURGE=1, and SYNCHOOK_SYNC,
SYNCHOOK_POST_SYNC, ... for the daemon settings (the option name in capitals, dashes
as underscores).

Exit 0 when done, 1 when it failed (nothing half-installed), 2 for a bad option or
setting (nothing done).
USAGE
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
    public_dirs "$(dirname "$1")" || fatal "cannot create $(dirname "$1")"
    cat >"$1.tmp.$$" || fatal "cannot write $1"
    if ! chmod "$2" "$1.tmp.$$" || ! mv -f "$1.tmp.$$" "$1"; then
        rm -f "$1.tmp.$$"
        fatal "cannot install $1"
    fi
}

# public_dirs DIR: DIR and its missing parents, mode 0755 whatever the umask (a
# program's directory, /etc/systemd/system in an image root).
public_dirs() {
    (umask 022 && mkdir -p "$1")
}

# remove_files PATH...: those that exist (files or links), through run.
remove_files() {
    for remove_path in "$@"; do
        if [ -f "$remove_path" ] || [ -L "$remove_path" ]; then
            run rm -f "$remove_path"
        fi
    done
}

have() { command -v "$1" >/dev/null 2>&1; }

# Is pid $1 running?  A zombie is not (kill -0 says it is): waiting for one would
# wait for whoever must reap it.
pid_alive() {
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 1
    pid_state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
    [ "$pid_state" != Z ]
}

# A short pause; POSIX sleep takes whole seconds, most take fractions.
nap() { sleep 0.5 2>/dev/null || sleep 1; }

option_var() {
    printf 'SYNCHOOK_%s' "$(printf '%s' "$1" | tr 'a-z-' 'A-Z_')"
}

checksum() {
    if have sha256sum; then
        sha256sum "$1" | cut -d' ' -f1
    elif have shasum; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        "$HOST_PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
    fi
}

# A fingerprint of everything installed, to restart only when something changed.
fingerprint() {
    for fingerprint_f in "$PROGRAM" "$MODULE_DIR/synchook.py" "$ROOT$CONFIG_FILE" "$(service_file)" \
            "$(socket_file)"; do
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
    PYTHON=${SYNCHOOK_PYTHON:-}
    RESET=${SYNCHOOK_RESET:-0}
    OPEN_FIREWALL=${SYNCHOOK_OPEN_FIREWALL:-0}
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
            -h|--help) usage; MAIN_DONE=1; exit 0 ;;
            --from) need_value "$@"; FROM=$2; shift ;;
            --sha256) need_value "$@"; SHA256=$2; shift ;;
            --prefix) need_value "$@"; PREFIX=$2; shift ;;
            --init) need_value "$@"; INIT=$2; shift ;;
            --root) need_value "$@"; ROOT=$2; shift ;;
            --python) need_value "$@"; PYTHON=$2; shift ;;
            --reset) RESET=1 ;;
            --open-firewall) OPEN_FIREWALL=1 ;;
            --no-start) NO_START=1 ;;
            --dry-run) DRY_RUN=1 ;;
            --uninstall) UNINSTALL=1 ;;
            --purge) PURGE=1; UNINSTALL=1 ;;
            --version) printf 'install.sh for synchook %s\n' "$INSTALLER_VERSION"; MAIN_DONE=1; exit 0 ;;
            --unset)
                need_value "$@"
                is_daemon_option "$2" || usage_error "--unset $2: not a setting (one of: $(printf '%s' "$DAEMON_OPTIONS" | tr '\n' ' '))"
                eval "UNSET_$(option_var "$2")=1; export UNSET_$(option_var "$2")"
                SETTINGS_GIVEN=1
                shift ;;
            --*=*) usage_error "write '${1%%=*} VALUE', not '$1'" ;;
            --*)
                is_daemon_option "${1#--}" || usage_error "unknown option $1 (see --help)"
                need_value "$@"
                add_setting "${1#--}" "$2"
                shift ;;
            *) usage_error "unexpected argument '$1' (see --help)" ;;
        esac
        shift
    done
    [ "$PURGE" = 1 ] && UNINSTALL=1
    ROOT=${ROOT%/}
    [ -n "$ROOT" ] && NO_START=1
    case $INIT in ""|systemd|openrc|sysv|rc.local|none) ;;
        *) usage_error "--init $INIT: must be systemd, openrc, sysv, rc.local or none" ;; esac
    if [ -n "$SHA256" ]; then
        case $SHA256 in *[!0-9a-fA-F]*) usage_error "--sha256 $SHA256: not a hexadecimal SHA-256" ;; esac
        [ ${#SHA256} = 64 ] || usage_error "--sha256: a SHA-256 is 64 hexadecimal digits, not ${#SHA256}"
    fi
    case $PYTHON in ""|/*) ;; *) usage_error "--python $PYTHON: give the absolute path" ;; esac
    PROGRAM="$ROOT$PREFIX/sbin/synchook"           # a launcher: runs the module below
    MODULE_DIR="$ROOT$PREFIX/lib/synchook"         # synchook.py and its compiled bytecode
}

need_value() {
    [ $# -ge 2 ] || usage_error "$1 needs a value"
}

# add_setting NAME VALUE: remember one daemon setting (a later one wins).  It is
# exported as SETTING_SYNCHOOK_NAME for the merge into the config file.
add_setting() {
    add_var=$(option_var "$1")
    eval "SETTING_$add_var=\$2; export SETTING_$add_var"
    SETTINGS_GIVEN=1
}

is_daemon_option() {
    for is_name in $DAEMON_OPTIONS; do
        [ "$is_name" = "$1" ] && return 0
    done
    return 1
}

# --- what is there ---------------------------------------------------------

python_ok() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 6))' 2>/dev/null
}

# HOST_PYTHON checks the program and merges the settings here; PYTHON is the
# interpreter written into the service, as the target sees it.  They are the same
# but for --root (an image) or --python.
find_python() {
    HOST_PYTHON=""
    for find_py in python3 python3.13 python3.12 python3.11 python3.10 python3.9 \
                   python3.8 python3.7 python3.6 /usr/libexec/platform-python; do
        # 3.6 or newer, and the real binary, not a wrapper such as a pyenv shim (one
        # run: a shim costs a tenth of a second).
        if have "$find_py" && HOST_PYTHON=$("$find_py" -c 'import sys
if sys.version_info >= (3, 6): print(sys.executable)' 2>/dev/null) && [ -n "$HOST_PYTHON" ]; then
            break
        fi
        HOST_PYTHON=""
    done
    # The distribution's interpreter over one in a home directory (pyenv), which PATH
    # may name first: a service must not depend on a user's files.
    case $HOST_PYTHON in
        /root/*|/home/*)
            for find_py in /usr/bin/python3 /usr/libexec/platform-python /usr/local/bin/python3; do
                if [ -x "$find_py" ] && python_ok "$find_py"; then
                    info "using $find_py rather than $HOST_PYTHON (in a home directory); --python PATH chooses"
                    HOST_PYTHON=$find_py
                    break
                fi
            done ;;
    esac
    if [ -z "$HOST_PYTHON" ]; then
        if [ -n "$ROOT" ]; then
            fatal "install.sh needs a Python 3.6 or newer on this machine too, to check synchook.py before it goes into $ROOT"
        fi
        fatal "synchook needs Python 3.6 or newer, and none was found. Install it with:
  Debian/Ubuntu:     apt-get install -y python3
  RHEL/Alma/Rocky:   dnf install -y python3   (RHEL 7: yum install -y python3)
  Alpine:            apk add python3
  SUSE:              zypper install -y python3"
    fi
    if [ -n "$PYTHON" ]; then
        if [ -n "$ROOT" ] && [ ! -e "$ROOT$PYTHON" ]; then
            warn "--python $PYTHON: not in $ROOT (yet?); the service will run it as given"
        elif [ -z "$ROOT" ] && ! python_ok "$PYTHON"; then
            fatal "--python $PYTHON: not a Python 3.6 or newer"
        fi
    elif [ -n "$ROOT" ]; then
        for find_rel in $ROOT_PYTHONS; do
            if [ -e "$ROOT/$find_rel" ] || [ -L "$ROOT/$find_rel" ]; then
                PYTHON="/$find_rel"
                break
            fi
        done
        [ -n "$PYTHON" ] || fatal "no Python 3 in $ROOT (looked for $(printf '%s' "$ROOT_PYTHONS" | tr '\n' ' ')): install python3 into the image first, or pass --python PATH (the interpreter's path inside the image)"
        info "Python in $ROOT: $PYTHON"
    else
        PYTHON=$HOST_PYTHON
        case $PYTHON in
            /root/*|/home/*) warn "the service will run $PYTHON, in a home directory (pyenv?): pass --python /usr/bin/python3 (or your distribution's) if that is not what you want" ;;
        esac
    fi
}

# The kind of service an earlier run installed, if any.
installed_kind() {
    for installed_kind in systemd openrc sysv rc.local; do
        installed_kind_of "$installed_kind" && return 0
    done
    return 0
}

# Does this busybox/Buildroot rcS run every /etc/init.d/S??* script?
rcs_runs_s_scripts() {
    [ -f "$ROOT/etc/init.d/rcS" ] && grep -qF 'S??*' "$ROOT/etc/init.d/rcS" 2>/dev/null
}

has_rc_dirs() {
    for has_dir in "$ROOT"/etc/rc[0-6].d; do
        [ -d "$has_dir" ] && return 0
    done
    return 1
}

detect_init() {
    INSTALLED_KIND=$(installed_kind)
    if [ -n "$INIT" ]; then
        INIT_WHY="--init"
    elif [ -n "$INSTALLED_KIND" ]; then
        INIT=$INSTALLED_KIND
        INIT_WHY="installed as $INIT before; --init KIND changes it"
    elif [ -n "$ROOT" ]; then
        # An image on disk: judge by its files (run/systemd/system exists only at run time).
        if [ -x "$ROOT/lib/systemd/systemd" ] || [ -x "$ROOT/usr/lib/systemd/systemd" ] \
                || [ -d "$ROOT/run/systemd/system" ]; then
            INIT=systemd; INIT_WHY="$ROOT has lib/systemd/systemd"
        elif [ -x "$ROOT/sbin/openrc-run" ] || [ -x "$ROOT/usr/sbin/openrc-run" ]; then
            INIT=openrc; INIT_WHY="$ROOT has sbin/openrc-run"
        elif [ -f "$ROOT/etc/alpine-release" ]; then
            fatal "$ROOT is an Alpine image without OpenRC: nothing in it would start synchook. Add OpenRC first (apk add --root $ROOT openrc), or pass --init KIND for the init your image runs"
        elif rcs_runs_s_scripts; then
            INIT=sysv; INIT_WHY="$ROOT/etc/init.d/rcS runs S??* scripts (Buildroot, busybox)"
        elif has_rc_dirs; then
            INIT=sysv; INIT_WHY="$ROOT has etc/rc?.d"
        elif [ -d "$ROOT/etc/init.d" ]; then
            INIT=sysv; INIT_WHY="$ROOT has etc/init.d"
        else
            INIT=rc.local; INIT_WHY="$ROOT has no other init system's files"
        fi
    elif [ -d /run/systemd/system ]; then
        INIT=systemd; INIT_WHY="systemd is running (/run/systemd/system)"
    elif have openrc-run || [ -x /sbin/openrc-run ]; then
        INIT=openrc; INIT_WHY="openrc-run exists"
    elif [ -d /etc/init.d ]; then
        INIT=sysv; INIT_WHY="/etc/init.d exists"
    else
        INIT=rc.local; INIT_WHY="no other init system found"
    fi
    info "service kind: $INIT ($INIT_WHY)"
}

# Buildroot and busybox systems run /etc/init.d/S??* from rcS.
sysv_script() {
    if rcs_runs_s_scripts; then
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

# systemd's socket unit: PID 1 holds the port from boot on, across synchook's
# restarts and crashes, so that no local user can bind it meanwhile.
socket_file() {
    printf '%s' "$ROOT/etc/systemd/system/$SERVICE.socket"
}

# --- getting synchook.py ---------------------------------------------------

fetch() {
    if have curl; then
        curl -fsSL --retry 2 -o "$2" "$1"
    elif have wget; then
        wget -q -O "$2" "$1"
    else
        "$HOST_PYTHON" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$1" "$2"
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
    # Whether it is a whole synchook that runs under $HOST_PYTHON: merge_settings.
}

# --- the settings ----------------------------------------------------------

# One Python run with the new program: first, whether it is one (a download cut
# short: exit 4 if it does not parse, 5 if it does not answer --version; its
# answer goes to $WORK/version).  Then the new config in $WORK/synchook.conf:
# the settings given now, over those of the existing file (unless --reset), read
# with synchook's own parser and written with sh quoting it reads back.  What
# changed goes to $WORK/changes, the values the service will use for port,
# address and TLS to $WORK/port, listen, tls, secret.
merge_settings() {
    merge_status=0
    "$HOST_PYTHON" -I -S - "$WORK" "$ROOT$CONFIG_FILE" "$RESET" "$SETTINGS_GIVEN" \
        2>"$WORK/merge.err" <<'PY' || merge_status=$?
import contextlib, io, os, re, sys
work, existing, reset, given_any = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
sys.path.insert(0, work)
try:
    import synchook
except SyntaxError:
    sys.exit(4)
except Exception:
    sys.exit(5)
answer = io.StringIO()
try:
    with contextlib.redirect_stdout(answer):
        synchook.main(["--version"])          # argparse prints, then exits
except SystemExit:
    pass
except Exception:
    sys.exit(5)
if not answer.getvalue().startswith("synchook "):
    sys.exit(5)
with open(os.path.join(work, "version"), "w") as out:
    out.write(answer.getvalue().strip())
old = {}
if os.path.isfile(existing):
    try:
        old = {name: value for name, (value, _) in synchook.read_config_file(existing).items()}
    except synchook.ConfigError as err:
        sys.exit("error: cannot read the existing %s: %s (fix it, or pass --reset)" % (existing, err))
given = {o.env: os.environ["SETTING_" + o.env] for o in synchook.OPTIONS
         if "SETTING_" + o.env in os.environ}
unset = {o.env for o in synchook.OPTIONS if os.environ.get("UNSET_" + o.env) == "1"}
final, changes = synchook.merge_settings(old, given, unset, reset)
with open(os.path.join(work, "synchook.conf"), "w") as out:
    out.write(synchook.config_text(final, "install.sh"))
# The new program judges the new settings, as the service will read them (the
# file alone), before anything is written: exit 3, one line, for a bad one.
flags = synchook.Flags()
flags.config = os.path.join(work, "synchook.conf")
try:
    synchook.resolve_config(flags, environ={}, check_files=False, check_freeze=False)
except synchook.ConfigError as err:
    sys.stderr.write("synchook: error: %s\n" % re.sub(re.escape(flags.config) + r" line \d+: ",
                                                       "", str(err)))
    sys.exit(3)
with open(os.path.join(work, "changes"), "w") as out:
    out.write("".join(line + "\n" for line in changes))
with open(os.path.join(work, "shown"), "w") as out:       # for the summary: no secret
    out.write(" ".join("%s=%s" % (name[9:].lower().replace("_", "-"),
                                  "<hidden>" if name == "SYNCHOOK_SECRET" else value)
                       for name, value in final.items()))
effective = {o.env: final.get(o.env, o.default) for o in synchook.OPTIONS}
for name, key in (("port", "SYNCHOOK_PORT"), ("listen", "SYNCHOOK_LISTEN"),
                  ("tls", "SYNCHOOK_TLS"), ("timeout", "SYNCHOOK_TIMEOUT"),
                  ("allow", "SYNCHOOK_ALLOW"), ("freeze", "SYNCHOOK_FREEZE")):
    with open(os.path.join(work, name), "w") as out:
        out.write(effective[key] or "")
with open(os.path.join(work, "secret"), "w") as out:
    out.write("yes" if effective["SYNCHOOK_SECRET"] or effective["SYNCHOOK_SECRET_FILE"] else "")
# systemd's ListenStream= for synchook.socket: an address (systemd resolves no
# name: a --listen name leaves the binding to synchook, without the socket unit).
host, port = synchook.parse_listen(effective["SYNCHOOK_LISTEN"] or ""), effective["SYNCHOOK_PORT"]
try:
    address = synchook.ipaddress.ip_address(host) if host else None
    stream = port if host in ("", "::") else (
        "[%s]:%s" % (address, port) if address.version == 6 else "%s:%s" % (address, port))
except ValueError:
    stream = ""
with open(os.path.join(work, "listen_stream"), "w") as out:
    out.write(stream)
PY
    if [ "$merge_status" = 4 ]; then
        fatal "$FROM is not a Python program (truncated download?); nothing installed"
    elif [ "$merge_status" = 5 ]; then
        fatal "$FROM does not answer --version with $HOST_PYTHON (truncated?); nothing installed"
    elif [ "$merge_status" = 3 ]; then
        usage_error "the settings are not valid, nothing installed: $(tail -n 1 "$WORK/merge.err")"
    elif [ "$merge_status" != 0 ]; then
        cat "$WORK/merge.err" >&2
        fatal "cannot merge the settings (see above); nothing installed"
    fi
    VERSION=$(cat "$WORK/version")
    # synchook itself takes port 0 (a free one, for tests); a service needs a fixed one.
    [ "$(effective port)" != 0 ] || usage_error "the settings are not valid, nothing installed: --port 0: a service needs a fixed port (XO's bare tag calls 1727)"
    while read -r merge_change; do
        info "$merge_change"
    done <"$WORK/changes"
    # On a live system, every check a start makes (the secret file, the freeze plan,
    # the certificate, the port, the hooks), still before anything is written: a
    # setting that would not start never replaces a running agent.
    if [ -z "$ROOT" ] && [ "$DRY_RUN" != 1 ] && ! merge_check=$("$HOST_PYTHON" -I -S \
            "$WORK/synchook.py" check --no-run --config "$WORK/synchook.conf" 2>&1); then
        fatal "synchook would not start with these settings, nothing installed: $(printf '%s\n' \
            "$merge_check" | grep -e '^FAIL' -e 'error:' | sed 's/^FAIL *//' | head -n 3 \
            | tr '\n' ';' | sed 's/;$//; s/;/; /g')"
    fi
}

# --- a failed start puts the previous agent back ----------------------------

# Everything an install replaces, kept in $WORK/previous before it is: if the new
# synchook does not start, the old one is put back and started again, so a guest is
# never left without its agent by a re-install.
PREVIOUS=0
PREVIOUS_KIND=""
keep_previous() {
    [ -n "$ROOT" ] || [ "$DRY_RUN" = 1 ] && return 0
    [ -f "$MODULE_DIR/synchook.py" ] || [ -f "$ROOT$CONFIG_FILE" ] || return 0
    mkdir -p "$WORK/previous" || return 0
    # The service kind installed before, whose launcher remove_launchers is about
    # to remove when --init changes it: kept to be put back too.
    PREVIOUS_KIND=$(installed_kind)
    for keep_path in "$PROGRAM" "$ROOT$CONFIG_FILE" "$(service_file)" "$(socket_file)" \
            "$ROOT/etc/rc.local" "$ROOT$FIREWALL_UNDO" \
            "$(INIT=${PREVIOUS_KIND:-$INIT} service_file)"; do
        if [ -n "$keep_path" ] && [ -f "$keep_path" ]; then
            mkdir -p "$WORK/previous$(dirname "$keep_path")"
            cp -p "$keep_path" "$WORK/previous$keep_path" || return 0
        fi
    done
    if [ -d "$MODULE_DIR" ]; then
        mkdir -p "$WORK/previous$(dirname "$MODULE_DIR")"
        cp -Rp "$MODULE_DIR" "$WORK/previous$MODULE_DIR" || return 0
    fi
    PREVIOUS=1
}

restore_previous() {
    rollback_firewall
    if [ -n "$PREVIOUS_KIND" ] && [ "$PREVIOUS_KIND" != "$INIT" ]; then
        info "putting the $PREVIOUS_KIND service back in place of the $INIT one"
        remove_launcher "$INIT"
        INIT=$PREVIOUS_KIND
    fi
    (cd "$WORK/previous" && find . -type f) | while read -r restore_path; do
        restore_path=${restore_path#.}
        public_dirs "$(dirname "$restore_path")"
        cp -p "$WORK/previous$restore_path" "$restore_path"
    done
    case $INIT in
        systemd) systemctl daemon-reload >/dev/null 2>&1
            [ -f "$(socket_file)" ] && systemctl enable "$SERVICE.socket" >/dev/null 2>&1
            systemctl enable "$SERVICE" >/dev/null 2>&1 ;;
        openrc) rc-update add "$SERVICE" default >/dev/null 2>&1 ;;
        sysv) enable_sysv ;;
    esac
    start_service
}

effective() { cat "$WORK/$1" 2>/dev/null; }

# The program is installed as a module with its bytecode compiled now, and a
# launcher: imported from a .pyc, synchook's code costs ~5 MB less memory for
# the life of the daemon than the same file run as a script (whose syntax tree
# CPython keeps).  The launcher runs Python with -B: nothing is ever compiled or
# written later (a stale .pyc after a Python upgrade means the source is read).
install_program() {
    if [ -f "$MODULE_DIR/synchook.py" ] && [ -d "$MODULE_DIR/__pycache__" ] \
            && [ "$(checksum "$MODULE_DIR/synchook.py")" = "$(checksum "$WORK/synchook.py")" ]; then
        info "$PREFIX/lib/synchook/synchook.py unchanged: its bytecode stands"
    else
        write_file "$MODULE_DIR/synchook.py" 0644 <"$WORK/synchook.py"
        compile_program
    fi
    launcher | write_file "$PROGRAM" 0755
}

launcher() {
    cat <<LAUNCHER
#!$PYTHON -ISB
# synchook (installed by install.sh): runs $PREFIX/lib/synchook/synchook.py from
# its compiled bytecode.
import os, sys
sys.dont_write_bytecode = True       # as -B: also when started as python3 -I -S synchook
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))),
                                "lib", "synchook"))
import synchook
sys.exit(synchook.main())
LAUNCHER
}

# Bytecode for the target's own Python; in an image, only if that Python runs here.
compile_program() {
    compile_python=$PYTHON
    [ -n "$ROOT" ] && compile_python="$ROOT$PYTHON"
    if [ "$DRY_RUN" = 1 ]; then
        printf 'dry-run: would compile %s/synchook.py with %s\n' "$MODULE_DIR" "$compile_python" >&2
    elif "$compile_python" -c 'pass' 2>/dev/null; then
        rm -rf "$MODULE_DIR/__pycache__"
        # dfile: the path as the target sees it, so that an image's bytecode is the same
        # whatever directory it was built in, and tracebacks name the real file.
        # umask 022: __pycache__ 0755 and the bytecode 0644, as the source.
        (umask 022 && "$compile_python" -I -S -c 'import py_compile, sys; py_compile.compile(sys.argv[1], dfile=sys.argv[2], doraise=True)' \
            "$MODULE_DIR/synchook.py" "$PREFIX/lib/synchook/synchook.py") || fatal "cannot compile $MODULE_DIR/synchook.py"
    else
        info "$PYTHON does not run on this machine: no bytecode compiled, synchook runs from source (about 5 MB more memory)"
    fi
}

install_config() {
    if [ "$SETTINGS_GIVEN" = 0 ] && [ "$RESET" != 1 ] && [ -f "$ROOT$CONFIG_FILE" ]; then
        info "keeping $CONFIG_FILE (no settings given)"
        return 0
    fi
    write_file "$ROOT$CONFIG_FILE" 0600 <"$WORK/synchook.conf"
}

# --- services --------------------------------------------------------------

daemon_command() {
    printf '%s -I -S %s --config %s' "$PYTHON" "$PREFIX/sbin/synchook" "$CONFIG_FILE"
}

stop_wait() {
    stop_timeout=$(effective timeout | sed 's/\..*//')
    case $stop_timeout in ''|*[!0-9]*) stop_timeout=55 ;; esac
    printf '%s' $(( stop_timeout * 2 + 30 ))
}

systemd_unit() {
    unit_socket=""
    uses_socket && unit_socket="Requires=$SERVICE.socket
After=$SERVICE.socket
"
    cat <<UNIT
[Unit]
Description=synchook: Xen Orchestra VM sync hook agent
After=network-online.target
Wants=network-online.target
${unit_socket}
[Service]
Type=notify
ExecStart=$(daemon_command)
Restart=on-failure
RestartSec=2
# On stop synchook lets a running hook finish, then runs the post command if a
# window is open: give it longer than two hook timeouts. KillMode=process signals
# synchook alone: it ends its own commands, and its guardian (a shell that closes
# a window synchook could not, should synchook be killed) must outlive it.
TimeoutStopSec=$(stop_wait)
KillMode=process
# An OOM kill of one of synchook's commands must not make systemd stop synchook
# in the middle of a window (the default, OOMPolicy=stop, would release the guest
# during XO's snapshot without telling XO).
OOMPolicy=continue
# No OOMScoreAdjust=: synchook lowers its own score, and its commands must keep
# the score they would have had (a unit's score is inherited by every command).
# No setting that gives the unit a mount namespace (ProtectSystem, ProtectHome,
# ProtectKernelTunables, ProtectControlGroups, PrivateTmp, PrivateDevices,
# PrivateMounts, ReadOnlyPaths and the like): systemd builds that namespace before
# it starts synchook, with a mkdir on /, which waits for as long as / is frozen.
# A restart after a crash during a window with / frozen would never start, and
# nothing would thaw the guest. qemu-guest-agent's unit has none of them either.

[Install]
WantedBy=multi-user.target
UNIT
}

# synchook.socket binds --listen's address (every address, IPv4 and IPv6, by
# default) and --port; a --listen name (systemd resolves none) goes without it.
uses_socket() {
    [ "$INIT" = systemd ] && [ -n "$(effective listen_stream)" ]
}

systemd_socket() {
    cat <<SOCKET
[Unit]
Description=synchook's port, held by systemd across synchook's restarts and crashes

[Socket]
ListenStream=$(effective listen_stream)
BindIPv6Only=both
Backlog=1024
NoDelay=true

[Install]
WantedBy=sockets.target
SOCKET
}

openrc_script() {
    cat <<OPENRC
#!/sbin/openrc-run
# synchook: Xen Orchestra VM sync hook agent (written by install.sh)
name="synchook"
description="Xen Orchestra VM sync hook agent"
command="$PYTHON"
command_args="-I -S $PREFIX/sbin/synchook --config $CONFIG_FILE --syslog"
supervisor=supervise-daemon
pidfile="/run/\${RC_SVCNAME}.pid"
respawn_delay=2
# synchook's start-up lines (and a failed start's error); later lines go to syslog,
# or to $FILE_LOG where there is no syslog socket
output_log="$FILE_LOG"
error_log="$FILE_LOG"
# let a running hook and the post command finish before SIGKILL
retry="TERM/$(stop_wait)/KILL/5"

depend() {
    need net
    use logger
}

start_pre() {
    # a bad setting is shown here, on the terminal, not only in the log
    "\$command" -I -S $PREFIX/sbin/synchook check --parse-only --syslog --config $CONFIG_FILE >/dev/null
}
OPENRC
}

sysv_script_text() {
    cat <<SYSV
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

# Where systemd runs, Debian's init-functions hand this script's start, stop and
# restart to systemctl: synchook never runs twice, beside its unit.
if [ -r /lib/lsb/init-functions ]; then
    # shellcheck source=/dev/null
    . /lib/lsb/init-functions
fi

PYTHON="$PYTHON"
PROGRAM="$PREFIX/sbin/synchook"
CONFIG="$CONFIG_FILE"
PIDFILE=$PID_FILE
STARTLOG=$START_LOG
STOP_WAIT=$(stop_wait)

# A removed, not purged, package leaves this script behind: nothing to run.
[ -x "\$PROGRAM" ] || exit 0

# A zombie is not running: kill -0 succeeds on one, and waiting for it would wait
# for whoever must reap it.
alive() {
    [ -n "\$1" ] && kill -0 "\$1" 2>/dev/null || return 1
    alive_state=\$(sed 's/.*) //' "/proc/\$1/stat" 2>/dev/null | cut -c1)
    [ "\$alive_state" != Z ]
}

running() {
    [ -f "\$PIDFILE" ] && alive "\$(cat "\$PIDFILE")"
}

# Does synchook PID restart in place on SIGUSR2 (1.6 and later)?  Its mask of
# caught signals says so (bit 12); an older one would die of the signal.
restarts_in_place() {
    caught=\$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/\$1/status" 2>/dev/null)
    caught=\${caught#????????}
    [ -n "\$caught" ] && [ \$(( 0x\$caught & 0x800 )) != 0 ]
}

# synchook runs itself again in the same process, keeping its listening socket:
# the port is never free, connections wait.  An open window closes first.
restart() {
    if ! running || ! restarts_in_place "\$(cat "\$PIDFILE")"; then stop; start; return; fi
    pid=\$(cat "\$PIDFILE")
    : >"\$STARTLOG"
    kill -USR2 "\$pid"
    waited=0
    while [ \$waited -lt \$STOP_WAIT ]; do
        listening "\$pid" "restarted in place (pid \$pid)" && return 0
        [ \$? = 1 ] && return 1
        sleep 0.5 2>/dev/null || sleep 1
        waited=\$((waited + 1))
    done
    echo "synchook restarts in place once its open window closes (synchook status)"; return 1
}

# listening PID DONE: 0 (DONE said) once STARTLOG says synchook listens, 1 (its log
# shown) if PID died, 2 while neither.
listening() {
    if ! alive "\$1"; then
        echo "synchook failed to start:"; cat "\$STARTLOG"; rm -f "\$PIDFILE"; return 1
    fi
    grep -q ' listening on ' "\$STARTLOG" 2>/dev/null || return 2
    echo "synchook \$2"
}

start() {
    if running; then echo "synchook is already running"; return 0; fi
    # Until it listens, synchook copies its log lines to stderr, kept in STARTLOG:
    # a failed start's own error line (a bad setting, a port in use) is shown here.
    # Made 0600 first: the lines name the commands, which may hold a password.
    rm -f "\$STARTLOG"; (umask 077 && : >"\$STARTLOG")
    "\$PYTHON" -I -S "\$PROGRAM" --config "\$CONFIG" --syslog </dev/null >/dev/null 2>>"\$STARTLOG" &
    echo \$! > "\$PIDFILE"
    # 20 s to listen; longer while it first closes a window a dead run left open
    # (its post phase may run a command for up to the timeout).
    waited=0
    while [ \$waited -lt 40 ] || { [ \$waited -lt \$((STOP_WAIT * 2)) ] \\
            && grep -q 'ended with a window open' "\$STARTLOG" 2>/dev/null; }; do
        listening "\$(cat "\$PIDFILE")" started && return 0
        [ \$? = 1 ] && return 1
        sleep 0.5 2>/dev/null || sleep 1
        waited=\$((waited + 1))
    done
    echo "synchook started but is not listening after \$((waited / 2)) s:"; cat "\$STARTLOG"; return 1
}

stop() {
    if ! running; then echo "synchook is not running"; rm -f "\$PIDFILE"; return 0; fi
    pid=\$(cat "\$PIDFILE")
    kill -TERM "\$pid"
    kill -CONT "\$pid" 2>/dev/null    # a stopped synchook (^Z, SIGSTOP) gets the TERM too
    waited=0
    while alive "\$pid" && [ \$waited -lt \$STOP_WAIT ]; do
        sleep 1; waited=\$((waited + 1))
    done
    alive "\$pid" && kill -KILL "\$pid"
    rm -f "\$PIDFILE"
    echo "synchook stopped"
}

case "\$1" in
    start) start ;;
    stop) stop ;;
    restart|force-reload) restart ;;
    status)
        if running; then echo "synchook is running (pid \$(cat "\$PIDFILE"))"; exit 0; fi
        echo "synchook is not running"; exit 3 ;;
    *) echo "Usage: \$0 {start|stop|restart|status}"; exit 2 ;;
esac
SYSV
}

RC_BEGIN="# BEGIN synchook (managed by install.sh; removed by install.sh --uninstall)"
RC_END="# END synchook"

rc_local_start() {
    printf 'rm -f %s; (umask 077 && : >%s)\n%s --syslog </dev/null >/dev/null 2>>%s &\necho $! > %s' \
        "$START_LOG" "$START_LOG" "$(daemon_command)" "$START_LOG" "$PID_FILE"
}

rc_local_block() {
    printf '%s\n%s\n%s\n' "$RC_BEGIN" "$(rc_local_start)" "$RC_END"
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

# FILE_LOG grows only where there is no syslog socket; where logrotate is, it is
# rotated (copytruncate: synchook keeps the file open, appending).
install_logrotate() {
    case $INIT in openrc|sysv|rc.local) ;; *) return 0 ;; esac
    [ -d "$ROOT/etc/logrotate.d" ] || return 0
    printf '%s {\n    weekly\n    maxsize 1M\n    rotate 4\n    compress\n    missingok\n    notifempty\n    copytruncate\n}\n' \
        "$FILE_LOG" | write_file "$ROOT$LOGROTATE_FILE" 0644
}

install_service() {
    install_logrotate
    case $INIT in
        systemd)
            systemd_unit | write_file "$(service_file)" 0644
            install_socket
            if [ -n "$ROOT" ]; then
                run public_dirs "$ROOT/etc/systemd/system/multi-user.target.wants"
                run ln -sf "/etc/systemd/system/$SERVICE.service" \
                    "$ROOT/etc/systemd/system/multi-user.target.wants/$SERVICE.service"
            else
                run systemctl daemon-reload || fatal "systemctl daemon-reload failed: is systemd running? (else pass --init KIND)"
                run systemctl enable "$SERVICE" >/dev/null 2>&1 || warn "systemctl enable failed"
            fi ;;
        openrc)
            openrc_script | write_file "$(service_file)" 0755
            if [ -n "$ROOT" ]; then
                run public_dirs "$ROOT/etc/runlevels/default"
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

# synchook.socket written (and enabled), or removed where --listen is a name.
SOCKET_CHANGED=0
install_socket() {
    socket_before=$(checksum "$(socket_file)" 2>/dev/null)
    if uses_socket; then
        systemd_socket | write_file "$(socket_file)" 0644
        if [ -n "$ROOT" ]; then
            run public_dirs "$ROOT/etc/systemd/system/sockets.target.wants"
            run ln -sf "/etc/systemd/system/$SERVICE.socket" \
                "$ROOT/etc/systemd/system/sockets.target.wants/$SERVICE.socket"
        fi
    else
        remove_socket
    fi
    [ "$socket_before" != "$(checksum "$(socket_file)" 2>/dev/null)" ] && SOCKET_CHANGED=1
    return 0
}

remove_socket() {
    [ -f "$(socket_file)" ] || return 0
    if [ -z "$ROOT" ] && have systemctl && [ -d /run/systemd/system ]; then
        run systemctl disable --now "$SERVICE.socket" >/dev/null 2>&1
    fi
    remove_files "$(socket_file)" "$ROOT/etc/systemd/system/sockets.target.wants/$SERVICE.socket"
}

# Start links in rc?.d, by the distribution's tool where it has one, else by hand.
enable_sysv() {
    case $(sysv_script) in */S99synchook) return 0 ;; esac     # rcS runs it
    if [ -z "$ROOT" ] && have update-rc.d; then
        run update-rc.d synchook defaults >/dev/null
    elif [ -z "$ROOT" ] && have chkconfig; then
        run chkconfig --add synchook
    elif has_rc_dirs; then
        for enable_level in 2 3 4 5; do
            [ -d "$ROOT/etc/rc$enable_level.d" ] && run ln -sf ../init.d/synchook "$ROOT/etc/rc$enable_level.d/S90synchook"
        done
        for enable_level in 0 1 6; do
            [ -d "$ROOT/etc/rc$enable_level.d" ] && run ln -sf ../init.d/synchook "$ROOT/etc/rc$enable_level.d/K10synchook"
        done
    else
        warn "no update-rc.d, no chkconfig, no /etc/rc?.d: nothing will start /etc/init.d/synchook at boot (add it to your boot scripts, or pass --init rc.local)"
    fi
}

# Non-zero when the service manager says the start failed (start_failed tells why).
start_service() {
    case $INIT in
        systemd) start_systemd ;;
        openrc) run rc-service "$SERVICE" restart \
            || { warn "rc-service $SERVICE restart failed"; return 1; } ;;
        # umask 022: synchook and its commands as the init system would start them,
        # not with install.sh's own 077.
        sysv) (umask 022 && run "$(sysv_script)" restart) \
            || { warn "$(sysv_script) restart failed"; return 1; } ;;
        rc.local)
            restart_rc_local_in_place && return 0
            stop_rc_local
            (umask 022 && run sh -c "$(rc_local_start)") ;;
        none) return 0 ;;
    esac
}

# The socket is restarted only when its address changed (the port is free for
# that moment only); else synchook alone, on the socket systemd keeps.
start_systemd() {
    if uses_socket && [ "$SOCKET_CHANGED" = 1 ]; then
        run systemctl stop "$SERVICE.service" "$SERVICE.socket"
        run systemctl enable "$SERVICE.socket" >/dev/null 2>&1 || warn "systemctl enable $SERVICE.socket failed"
        run systemctl start "$SERVICE.socket" \
            || { warn "systemctl start $SERVICE.socket failed (is port $(effective port) in use?)"; return 1; }
    fi
    run systemctl restart "$SERVICE" || { warn "systemctl restart $SERVICE failed"; return 1; }
}

# As the SysV script's restart: SIGUSR2 to a synchook that restarts in place.
restart_rc_local_in_place() {
    [ "$DRY_RUN" != 1 ] && [ -f "$PID_FILE" ] || return 1
    in_place_pid=$(cat "$PID_FILE")
    pid_alive "$in_place_pid" || return 1
    in_place_caught=$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$in_place_pid/status" 2>/dev/null)
    in_place_caught=${in_place_caught#????????}
    [ -n "$in_place_caught" ] && [ $(( 0x$in_place_caught & 0x800 )) != 0 ] || return 1
    : >"$START_LOG"
    run kill -USR2 "$in_place_pid"
    in_place_waited=0
    while pid_alive "$in_place_pid" && [ $in_place_waited -lt $(( $(stop_wait) * 2 )) ]; do
        grep -q ' listening on ' "$START_LOG" 2>/dev/null && info "synchook restarted in place" && return 0
        nap; in_place_waited=$((in_place_waited + 1))
    done
    return 1
}

stop_rc_local() {
    if [ -f "$PID_FILE" ] && pid_alive "$(cat "$PID_FILE")"; then
        run kill -TERM "$(cat "$PID_FILE")"
        run kill -CONT "$(cat "$PID_FILE")" 2>/dev/null
        stop_waited=0
        while [ "$DRY_RUN" != 1 ] && pid_alive "$(cat "$PID_FILE")" \
                && [ $stop_waited -lt 300 ]; do
            nap; stop_waited=$((stop_waited + 1))
        done
    fi
}

# Is synchook itself answering on its port?  Any HTTP answer whose Server header
# is synchook's (a 404 for a path that runs nothing; never /sync).
synchook_answers() {
    answers_host=$(effective listen)
    case $answers_host in ""|"::"|"0.0.0.0") answers_host=127.0.0.1 ;; esac
    "$HOST_PYTHON" -I -S - "$answers_host" "$(effective port)" "$(effective tls)" <<'PY' 2>/dev/null
import http.client, ssl, sys
host, port, tls = sys.argv[1].strip("[]"), int(sys.argv[2] or 1727), sys.argv[3]
if tls == "on":
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, port, timeout=2, context=context)
else:
    conn = http.client.HTTPConnection(host, port, timeout=2)
conn.request("GET", "/synchook-install-check")
sys.exit(0 if conn.getresponse().getheader("Server", "").startswith("synchook/") else 1)
PY
}

# After a start: synchook must answer within ANSWER_WAIT seconds, else its own
# error lines are shown and install.sh fails (at once when it has already exited).
wait_answering() {
    wait_tries=0
    while [ $wait_tries -lt $((ANSWER_WAIT * 2)) ]; do
        if synchook_answers; then
            info "synchook is listening on port $(effective port)"
            return 0
        fi
        service_exited && return 1
        nap
        wait_tries=$((wait_tries + 1))
    done
    return 1
}

# Has the synchook a SysV or rc.local start left in PID_FILE exited already?  No use
# waiting for its answer then.  systemd and OpenRC may start theirs again.
service_exited() {
    case $INIT in
        sysv|rc.local) [ -f "$PID_FILE" ] && ! pid_alive "$(cat "$PID_FILE" 2>/dev/null)" ;;
        *) return 1 ;;
    esac
}

# The new synchook did not answer: say why, put the previous one back if there was
# one, and fail.
start_failed() {
    start_failed_log=$(service_log)
    if [ "$PREVIOUS" = 1 ]; then
        warn "the new synchook does not answer on port $(effective port); putting the previous program, settings and service back"
        if restore_previous && wait_answering; then
            fatal "the new synchook did not start, so the previous one is running again, with its previous settings. The new one's log:
$start_failed_log"
        fi
        fatal "the new synchook did not start, and the previous one (put back) does not answer either. Its log:
$(service_log)"
    fi
    fatal "synchook does not answer on port $(effective port) after $ANSWER_WAIT s. Its log:
$start_failed_log"
}

# The daemon's own last lines, wherever this kind of service keeps them.
service_log() {
    case $INIT in
        systemd) journalctl -u "$SERVICE" -n 5 --no-pager -o cat 2>/dev/null \
            || printf '(see journalctl -u %s)' "$SERVICE" ;;
        openrc) tail -n 5 "$FILE_LOG" 2>/dev/null ;;
        *) cat "$START_LOG" 2>/dev/null ;;
    esac
}

log_hint() {
    case $INIT in
        systemd) printf 'journalctl -u synchook' ;;
        openrc|sysv|rc.local) printf 'syslog (/var/log/messages, /var/log/syslog or logread); %s where there is no syslog daemon' "$FILE_LOG" ;;
        *) printf 'stderr of synchook' ;;
    esac
}

summary() {
    summary_port=$(effective port)
    if [ -z "$ROOT" ] && [ "$DRY_RUN" != 1 ] && summary_tag=$("$PYTHON" -I -S "$PROGRAM" tag \
            --config "$CONFIG_FILE" 2>/dev/null | head -n 1) && [ -n "$summary_tag" ]; then
        # The exact tag, from synchook tag, with the secret masked: this output lands
        # in cloud-init and Ansible logs.
        summary_tag=$(printf '%s' "$summary_tag" | sed 's/token=[^&]*/token=<secret>/')
    elif [ -n "$(effective secret)" ]; then
        summary_tag="xo:notify-on-snapshot=https://<VM address>:${summary_port:-1727}/?token=<your secret>"
    elif [ "${summary_port:-1727}" = 1727 ] && [ "$(effective tls)" != off ]; then
        summary_tag="xo:notify-on-snapshot"
    elif [ "$(effective tls)" = off ]; then
        summary_tag="xo:notify-on-snapshot=http://<VM address>:${summary_port:-1727}/"
    else
        summary_tag="xo:notify-on-snapshot=https://<VM address>:$summary_port/"
    fi
    summary_what="installed"
    [ "$DRY_RUN" = 1 ] && summary_what="would be installed (dry run: nothing changed)"
    summary_changes=$(tr '\n' ',' <"$WORK/changes" | sed 's/,$//; s/,/, /g')
    summary_freeze=$(effective freeze)
    if [ "$(effective allow)" = none ]; then
        summary_access="NO ONE (--allow none: closed until you give XO's address)"
    elif [ -n "$(effective allow)" ]; then
        summary_access="clients in $(effective allow)"
    else
        summary_access="ANYONE who can reach port ${summary_port:-1727}"
    fi
    if [ -n "$(effective secret)" ]; then
        summary_access="$summary_access, with the secret"
    else
        summary_access="$summary_access, no secret"
    fi
    cat <<SUMMARY

synchook $summary_what ($VERSION)
  program:  $PROGRAM (Python: $PYTHON)
  config:   $ROOT$CONFIG_FILE (mode 0600; change it, then restart the service)
  settings: $(effective shown)
  changes:  ${summary_changes:-none}
  freezes:  ${summary_freeze:-nothing (--freeze not set: only your commands run)}
  who may run the hooks: $summary_access
  service:  $INIT${ROOT:+ (in $ROOT, not started)}
  logs:     $(log_hint)
  XO tag:   $summary_tag   (all tags: $PREFIX/sbin/synchook tag --config $CONFIG_FILE)
  see it:   $PREFIX/sbin/synchook status --config $CONFIG_FILE
SUMMARY
    if [ -z "$(effective allow)" ]; then
        warn "anyone who can reach port ${summary_port:-1727} can freeze this guest: re-run with --allow <XO's address> (XO itself; backups through an XO Proxy do not call the hook), and see README, Tagging, for a secret in the tag"
    fi
}

# --- the firewall, only when asked -----------------------------------------

open_firewall() {
    fw_port=$(effective port)
    fw_port=${fw_port:-1727}
    # --allow's addresses, where the firewall can take them: the port is opened to
    # XO alone, not to everyone; IPv6 too.
    fw_sources=$(effective allow | tr ',' ' ')
    if [ "$fw_sources" = none ]; then
        warn "--open-firewall: nothing opened, --allow none lets no one in"
        return 0
    fi
    if [ -n "$ROOT" ]; then
        warn "--open-firewall: not done in an image (--root); open port $fw_port/tcp in the image's firewall configuration"
        return 0
    fi
    # Each source goes into a firewall command: addresses and networks only (synchook
    # has parsed them; this keeps any other character out of the commands below).
    for fw_source in $fw_sources; do
        case $fw_source in
            *[!0-9A-Fa-f:./]*|'') usage_error "--allow $fw_source: not an address or a network" ;;
        esac
    done
    # The rules an earlier --open-firewall opened are closed first: a changed
    # --allow or --port leaves no old rule behind, and a re-run opens nothing twice.
    : >"$WORK/firewall-undo"
    : >"$WORK/firewall-opened"
    cp "$ROOT$FIREWALL_UNDO" "$WORK/firewall-old" 2>/dev/null || : >"$WORK/firewall-old"
    FIREWALL_CHANGED=1
    run_firewall_lines undo <"$WORK/firewall-old"
    if have firewall-cmd && firewall-cmd --state >/dev/null 2>&1; then
        if [ -z "$fw_sources" ]; then
            fw_open firewalld "firewall-cmd --permanent --add-port=$fw_port/tcp" \
                "firewall-cmd --permanent --remove-port=$fw_port/tcp"
        fi
        for fw_source in $fw_sources; do
            fw_rule="rule family=$(fw_family "$fw_source") source address=$fw_source port port=$fw_port protocol=tcp accept"
            fw_open firewalld "firewall-cmd --permanent --add-rich-rule='$fw_rule'" \
                "firewall-cmd --permanent --remove-rich-rule='$fw_rule'"
        done
        fw_open firewalld "firewall-cmd --reload" "firewall-cmd --reload"
    elif have ufw && ufw status 2>/dev/null | grep -q '^Status: active'; then
        if [ -z "$fw_sources" ]; then
            fw_open ufw "ufw allow $fw_port/tcp" "ufw delete allow $fw_port/tcp"
        fi
        for fw_source in $fw_sources; do
            fw_open ufw "ufw allow from $fw_source to any port $fw_port proto tcp" \
                "ufw delete allow from $fw_source to any port $fw_port proto tcp"
        done
        # After the allows (ufw keeps their order): anyone else is refused at once,
        # not dropped (XO left out of --allow would wait its whole 60 s timeout).
        [ -n "$fw_sources" ] && fw_open ufw "ufw reject $fw_port/tcp" "ufw delete reject $fw_port/tcp"
    elif have nft && nft list chain inet filter input >/dev/null 2>&1; then
        # Removed by its comment: nft deletes rules by handle.
        printf '%s\n' "nft_delete_synchook_rules" >>"$WORK/firewall-undo"
        # insert, not add: a rule appended after a final drop never matches.  The
        # reset first, so that the accepts inserted next come before it: anyone
        # else is refused at once, not dropped (XO would wait its 60 s timeout).
        if [ -n "$fw_sources" ]; then
            fw_open nftables "nft insert rule inet filter input tcp dport $fw_port reject with tcp reset comment synchook" ""
        else
            fw_open nftables "nft insert rule inet filter input tcp dport $fw_port accept comment synchook" ""
        fi
        for fw_source in $fw_sources; do
            fw_open nftables "nft insert rule inet filter input $(fw_nft_family "$fw_source") saddr $fw_source tcp dport $fw_port accept comment synchook" ""
        done
        warn "nftables: rules inserted in inet filter input for this boot; add them to /etc/nftables.conf to keep them"
    elif have iptables && iptables -S INPUT >/dev/null 2>&1; then
        # As for nftables: the reset first, the accepts inserted before it.
        for fw_cmd in iptables $(have ip6tables && printf ip6tables); do
            [ -n "$fw_sources" ] || break
            fw_spec="INPUT -p tcp --dport $fw_port -j REJECT --reject-with tcp-reset -m comment --comment synchook"
            fw_open "$fw_cmd" "$fw_cmd -I $fw_spec" "$fw_cmd -D $fw_spec"
        done
        for fw_source in ${fw_sources:-any}; do
            fw_tool=iptables
            [ "$(fw_family "$fw_source")" = ipv6 ] && fw_tool=ip6tables
            fw_match=""
            [ "$fw_source" != any ] && fw_match="-s $fw_source "
            for fw_cmd in $fw_tool $( [ "$fw_source" = any ] && have ip6tables && printf ip6tables); do
                fw_spec="INPUT -p tcp --dport $fw_port ${fw_match}-j ACCEPT -m comment --comment synchook"
                if ! eval "$fw_cmd -C $fw_spec" 2>/dev/null; then
                    fw_open "$fw_cmd" "$fw_cmd -I $fw_spec" "$fw_cmd -D $fw_spec"
                fi
            done
        done
        warn "iptables: rules added for this boot; save them (iptables-save, netfilter-persistent) to keep them"
    else
        info "--open-firewall: no active firewall found (firewalld, ufw, nftables, iptables): nothing to open"
        return 0
    fi
    # What --uninstall (or the next --open-firewall) runs to close it again, and,
    # as "# opened:" lines, what a failed re-install runs to open it again.
    sed 's/^/# opened: /' "$WORK/firewall-opened" | cat - "$WORK/firewall-undo" \
        | write_file "$ROOT$FIREWALL_UNDO" 0600
}

# fw_open NAME COMMAND UNDO: run COMMAND (a line of words made by open_firewall from
# checked values), keep UNDO.  A failure closes what this run opened, opens the
# earlier rules again, and fails the install before anything else is written.
fw_open() {
    if ! eval "run $2" >/dev/null; then
        rollback_firewall
        fatal "$1 could not open port $fw_port/tcp ($2): nothing installed, the firewall as it was"
    fi
    info "$1: $2"
    printf '%s\n' "$2" >>"$WORK/firewall-opened"
    [ -n "$3" ] && printf '%s\n' "$3" >>"$WORK/firewall-undo"
    return 0
}

# The firewall as it was before this run (a failed open, a failed start).
FIREWALL_CHANGED=0
rollback_firewall() {
    [ "$FIREWALL_CHANGED" = 1 ] || return 0
    FIREWALL_CHANGED=0
    run_firewall_lines undo <"$WORK/firewall-undo"
    run_firewall_lines opened <"$WORK/firewall-old"
    if [ -s "$WORK/firewall-old" ]; then
        write_file "$ROOT$FIREWALL_UNDO" 0600 <"$WORK/firewall-old"
    else
        remove_files "$ROOT$FIREWALL_UNDO"
    fi
}

# run_firewall_lines undo|opened: the lines of a firewall file (stdin) of that
# kind, each run as written (install.sh wrote them; the file is root's, 0600).
run_firewall_lines() {
    while IFS= read -r fw_line; do
        case $1:$fw_line in
            undo:'#'*|undo:|opened:) continue ;;
            opened:'# opened: '*) fw_line=${fw_line#'# opened: '} ;;
            opened:*) continue ;;
        esac
        eval "run $fw_line" >/dev/null 2>&1 && info "firewall: $fw_line"
    done
    return 0
}

fw_family() {
    case $1 in *:*) printf ipv6 ;; *) printf ipv4 ;; esac
}

fw_nft_family() {
    case $1 in *:*) printf ip6 ;; *) printf ip ;; esac
}

nft_delete_synchook_rules() {
    nft -a list chain inet filter input 2>/dev/null | sed -n 's/.*comment "synchook".*# handle \([0-9]*\).*/\1/p' \
        | while read -r nft_handle; do
            run nft delete rule inet filter input handle "$nft_handle"
        done
}

# What --open-firewall opened, closed again (--uninstall).
close_firewall() {
    [ -f "$ROOT$FIREWALL_UNDO" ] || return 0
    run_firewall_lines undo <"$ROOT$FIREWALL_UNDO"
    remove_files "$ROOT$FIREWALL_UNDO"
}

# --- removing --------------------------------------------------------------

# remove_launcher KIND: stop synchook as KIND runs it (on a live system) and
# remove KIND's files.  Used by --uninstall, and when --init changes the kind.
remove_launcher() {
    case $1 in
        systemd)
            remove_socket            # first: a connection would start synchook again
            if [ -z "$ROOT" ] && have systemctl && [ -d /run/systemd/system ]; then
                run systemctl disable --now "$SERVICE" >/dev/null 2>&1
            fi
            remove_files "$ROOT/etc/systemd/system/$SERVICE.service" \
                "$ROOT/etc/systemd/system/multi-user.target.wants/$SERVICE.service"
            if [ -z "$ROOT" ] && have systemctl && [ -d /run/systemd/system ]; then
                run systemctl daemon-reload
            fi ;;
        openrc)
            installed_kind_of openrc >/dev/null || return 0
            if [ -z "$ROOT" ] && have rc-service; then
                run rc-service "$SERVICE" stop
                run rc-update del "$SERVICE" default >/dev/null 2>&1
            fi
            remove_files "$ROOT/etc/init.d/$SERVICE" "$ROOT/etc/runlevels/default/$SERVICE" ;;
        sysv)
            for remove_script in "$ROOT/etc/init.d/synchook" "$ROOT/etc/init.d/S99synchook"; do
                if [ ! -f "$remove_script" ] || ! grep -q 'BEGIN INIT INFO' "$remove_script"; then
                    continue
                fi
                [ -z "$ROOT" ] && run "$remove_script" stop
                remove_files "$remove_script"
            done
            if [ -z "$ROOT" ] && have update-rc.d; then
                run update-rc.d -f synchook remove >/dev/null 2>&1
            elif [ -z "$ROOT" ] && have chkconfig; then
                run chkconfig --del synchook >/dev/null 2>&1
            fi
            remove_files "$ROOT"/etc/rc?.d/[SK][0-9][0-9]synchook ;;
        rc.local)
            [ -z "$ROOT" ] && stop_rc_local
            if [ -f "$ROOT/etc/rc.local" ] && grep -q '^# BEGIN synchook ' "$ROOT/etc/rc.local"; then
                if [ "$(rc_local_without_block | sed '/^[[:space:]]*$/d')" = '#!/bin/sh' ]; then
                    run rm -f "$ROOT/etc/rc.local"          # we made it; nothing else is in it
                else
                    rc_local_without_block | write_file "$ROOT/etc/rc.local" 0755
                fi
            fi ;;
    esac
    return 0
}

# Every launcher but KEEP's (all of them when KEEP is empty).
remove_launchers() {
    for remove_kind in systemd openrc sysv rc.local; do
        [ "$remove_kind" = "$1" ] && continue
        [ "$remove_kind" = "$(installed_kind_of "$remove_kind")" ] || continue
        info "removing the $remove_kind service of an earlier install"
        remove_launcher "$remove_kind"
    done
}

# installed_kind_of KIND: prints KIND if its launcher is there.
installed_kind_of() {
    case $1 in
        systemd) [ -f "$ROOT/etc/systemd/system/$SERVICE.service" ] ;;
        openrc) [ -f "$ROOT/etc/init.d/synchook" ] && head -n 1 "$ROOT/etc/init.d/synchook" | grep -q openrc-run ;;
        sysv) { [ -f "$ROOT/etc/init.d/synchook" ] && grep -q 'BEGIN INIT INFO' "$ROOT/etc/init.d/synchook"; } \
            || [ -f "$ROOT/etc/init.d/S99synchook" ] ;;
        rc.local) [ -f "$ROOT/etc/rc.local" ] && grep -q '^# BEGIN synchook ' "$ROOT/etc/rc.local" ;;
    esac && printf '%s' "$1"
}

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

# config_value PROGRAM NAME: NAME's value in the installed config as that installed
# synchook reads it (its own parser: sh quoting, export, comments), or nothing.
config_value() {
    [ -f "$ROOT$CONFIG_FILE" ] && [ -n "$1" ] || return 0
    value_python=$(sed -n '1s/^#!\([^ ]*\).*/\1/p' "$1" 2>/dev/null)
    for value_python in "$ROOT$value_python" python3; do
        "$value_python" -I -S - "${1%/sbin/synchook}/lib/synchook" "$ROOT$CONFIG_FILE" "$2" \
                <<'PY' 2>/dev/null && return 0
import sys
sys.dont_write_bytecode = True
sys.path.insert(0, sys.argv[1])
import synchook
print(synchook.read_config_file(sys.argv[2]).get(sys.argv[3], ("",))[0])
PY
    done
    return 0
}

uninstall() {
    uninstall_program=$(installed_program)
    uninstall_state=$(config_value "$uninstall_program" SYNCHOOK_STATE_DIR)
    remove_launchers ""
    remove_files "$PROGRAM" "$uninstall_program"
    for uninstall_lib in "$MODULE_DIR" "${uninstall_program%/sbin/synchook}/lib/synchook"; do
        case $uninstall_lib in */lib/synchook) [ -d "$uninstall_lib" ] && run rm -rf "$uninstall_lib" ;; esac
    done
    [ -z "$ROOT" ] && remove_files "$PID_FILE" "$START_LOG"
    remove_files "$ROOT$LOGROTATE_FILE"
    close_firewall
    uninstall_done="removed"
    [ "$DRY_RUN" = 1 ] && uninstall_done="would remove (dry run: nothing changed)"
    if [ "$PURGE" = 1 ]; then
        uninstall_state=${uninstall_state:-/var/lib/synchook}
        run rm -rf "$ROOT$CONFIG_FILE" "$ROOT$uninstall_state"
        remove_files "$ROOT$FILE_LOG"
        if [ -z "$ROOT" ] && [ -d "$RUNTIME_DIR" ]; then
            # A blank first line is no window (synchook keeps the marker between windows).
            if window_marker_open "$RUNTIME_DIR/window.json"; then
                warn "kept $RUNTIME_DIR: it holds a window's marker (a post phase still owed: synchook recover --runtime-dir $RUNTIME_DIR)"
            else
                run rm -rf "$RUNTIME_DIR"
            fi
        fi
        info "$uninstall_done synchook, its configuration, $uninstall_state and its log"
    else
        info "$uninstall_done synchook (kept $CONFIG_FILE; --purge removes it)"
    fi
}

# Does synchook's marker say a window is open?  Its first line is not blank (the
# file stays, closed, between windows), or it is something else than a file.
window_marker_open() {
    [ -L "$1" ] && return 0
    [ -e "$1" ] || return 1
    [ -f "$1" ] || return 0
    marker_first=
    IFS= read -r marker_first <"$1"
    [ -n "$marker_first" ]
}

# --- main ------------------------------------------------------------------

# The line that calls main ends with this word: a download cut anywhere in that line
# (after "main", say, which would run main without the arguments given to sh -s)
# drops it, and main then refuses to run.
END_OF_SCRIPT=--end-of-install.sh

# A synchook installed from a .deb or .rpm belongs to the package manager:
# install.sh would run a second service beside it, or write over its files.
package_manager_owning() {
    if have dpkg-query && [ "$(dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f='${Status}' \
            synchook 2>/dev/null)" = "install ok installed" ]; then
        printf 'dpkg'
    elif have rpm && rpm_database && rpm --root "${ROOT:-/}" --dbpath "$RPM_DB" -q --quiet \
            synchook 2>/dev/null; then
        printf 'rpm'
    fi
}

# RPM_DB: where the target's rpm database is, if it has one (asking rpm about a
# database that does not exist would create one, in the image or in ~/.rpmdb).
rpm_database() {
    for RPM_DB in /var/lib/rpm /usr/lib/sysimage/rpm; do
        for rpm_file in rpmdb.sqlite Packages Packages.db; do
            [ -f "$ROOT$RPM_DB/$rpm_file" ] && return 0
        done
    done
    return 1
}

# A removed synchook package whose settings dpkg still records (apt remove, not
# purge): dpkg's record is purged, its /etc/synchook.conf kept as install.sh's
# own, so that a later `apt purge` cannot take the config from under this install.
forget_removed_package() {
    [ -z "$ROOT" ] && [ "$DRY_RUN" != 1 ] && have dpkg-query || return 0
    case $(dpkg-query -W -f='${Status}' synchook 2>/dev/null) in
        *config-files) ;;
        *) return 0 ;;
    esac
    info "taking the settings over from the removed synchook package (dpkg --purge synchook: its leftover record)"
    [ -f "$CONFIG_FILE" ] && { cp -p "$CONFIG_FILE" "$CONFIG_FILE.kept" || fatal "cannot keep $CONFIG_FILE"; }
    dpkg --purge synchook >/dev/null || fatal "dpkg --purge synchook failed"
    if [ -f "$CONFIG_FILE.kept" ]; then
        mv "$CONFIG_FILE.kept" "$CONFIG_FILE" || fatal "cannot put $CONFIG_FILE back (it is in $CONFIG_FILE.kept)"
    fi
}

main() {
    eval "main_last=\${$#}"
    if [ "$main_last" != "$END_OF_SCRIPT" ]; then
        printf 'error: install.sh ended before its last line (a cut download?): nothing was done\n' >&2
        FATAL=1
        exit 1
    fi
    # Drop that last word: the rest are the arguments given.
    main_count=$#
    main_index=0
    for main_arg do
        [ $main_index = 0 ] && set --
        main_index=$((main_index + 1))
        [ $main_index -lt $main_count ] && set -- "$@" "$main_arg"
    done
    # Nothing written is readable by others unless given its mode (write_file,
    # public_dirs): a temporary config holding the secret included.
    umask 077
    parse_args "$@"
    if [ "$DRY_RUN" != 1 ] && [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
        fatal "run install.sh as root (or with --root DIR to install into a directory)"
    fi
    main_owner=$(package_manager_owning)
    if [ -n "$main_owner" ]; then
        fatal "synchook is installed from a package here ($main_owner): change its settings with 'synchook configure --allow ... --freeze ...', or remove the package first (its /etc/synchook.conf stays), then run install.sh"
    fi
    if [ "$UNINSTALL" = 1 ]; then
        uninstall
        MAIN_DONE=1
        return 0
    fi
    find_python
    detect_init
    get_program
    merge_settings                       # checked by the new program: nothing written yet
    forget_removed_package
    before=$(fingerprint)
    keep_previous
    # The firewall first: if it cannot be opened, nothing else is written.
    [ "$OPEN_FIREWALL" = 1 ] && open_firewall
    remove_launchers "$INIT"             # another kind installed before: stopped, removed
    install_program
    install_config
    install_service
    after=$(fingerprint)
    if [ "$NO_START" != 1 ] && [ "$DRY_RUN" = 1 ] && [ "$INIT" != none ]; then
        start_service                      # prints what it would run
    elif [ "$NO_START" != 1 ] && [ "$INIT" != none ]; then
        if [ "$before" != "$after" ] || ! synchook_answers; then
            if ! start_service || ! wait_answering; then
                start_failed
            fi
        else
            info "nothing changed: service left running"
            wait_answering || start_failed
        fi
    fi
    summary
    MAIN_DONE=1
}

main "$@" --end-of-install.sh
