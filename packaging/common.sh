# packaging/common.sh: what the .deb's and the .rpm's maintainer scripts share.
# packaging/build puts it at the top of each script (POSIX sh).  Set before it:
# UNIT_DIR, /lib/systemd/system in the .deb, /usr/lib/systemd/system in the .rpm;
# INVOKE, what starts and stops units: deb-systemd-invoke (which honours
# policy-rc.d) in the .deb, systemctl in the .rpm.

DIGESTS=/run/synchook.package-digests    # tmpfs: from the upgrade's start to its end
CARRIED=/etc/synchook.conf.install-sh    # install.sh's settings, while the package unpacks

systemd_running() { [ -d /run/systemd/system ]; }

# One checksum for what a restart of each kind depends on.
units_digest() {
    cat "$UNIT_DIR/synchook.service" "$UNIT_DIR/synchook.socket" 2>/dev/null | cksum
}
program_digest() {
    cat /usr/lib/synchook/synchook.py /usr/sbin/synchook /etc/synchook.conf \
        /etc/init.d/synchook 2>/dev/null | cksum
}

# Before an upgrade unpacks: what the running synchook was started from.
record_digests() {
    printf 'units %s\nprogram %s\n' "$(units_digest)" "$(program_digest)" >"$DIGESTS"
}

# After an upgrade: restart only for what changed.  A changed unit is a full
# restart (systemd holds the port); a changed program or config, a restart in
# place (SIGUSR2: once no window is open, the port never closed); nothing
# changed, nothing done.
apply_upgrade() {
    [ -f "$DIGESTS" ] || return 0
    units_before=$(sed -n 's/^units //p' "$DIGESTS")
    program_before=$(sed -n 's/^program //p' "$DIGESTS")
    rm -f "$DIGESTS"
    if [ "$units_before" != "$(units_digest)" ] && systemd_running; then
        echo "synchook: its systemd units changed: restarting it"
        systemctl daemon-reload
        $INVOKE try-restart synchook.socket synchook.service || true
    elif [ "$program_before" != "$(program_digest)" ]; then
        echo "synchook: restarting it in place (after any open window; the port stays open)"
        if systemd_running; then
            restart_in_place
        else
            init_script synchook restart || true
        fi
    else
        echo "synchook: nothing it runs changed: not restarted"
    fi
}

# SIGUSR2 to the running service's synchook: it runs itself again (same pid,
# same socket) once no window is open.  Nothing else sends that signal.
restart_in_place() {
    if systemctl -q is-active synchook.service; then
        systemctl kill --kill-who=main --signal=USR2 synchook.service || true
    fi
}

# The SysV script's ACTION, through invoke-rc.d where there is one (Debian).
init_script() {
    if command -v invoke-rc.d >/dev/null; then
        invoke-rc.d "$1" "$2"
    else
        "/etc/init.d/$1" "$2"
    fi
}

# A synchook that install.sh installed before this package: its service stopped
# (a window open is closed by its post phase) and removed, its program removed,
# its settings carried over to the package (never lost, never a conffile prompt).
retire_install_sh() {
    old_program=$(grep -ho '[^ "=]*/sbin/synchook' /etc/systemd/system/synchook.service \
        /etc/init.d/synchook /etc/rc.local 2>/dev/null | head -n 1)
    if [ -n "$old_program" ]; then
        echo "synchook: taking over from the synchook install.sh installed ($old_program)"
        if [ -f /etc/systemd/system/synchook.service ]; then
            if systemd_running; then
                $INVOKE stop synchook.service synchook.socket >/dev/null 2>&1 || true
            fi
            rm -f /etc/systemd/system/synchook.service /etc/systemd/system/synchook.socket \
                /etc/systemd/system/multi-user.target.wants/synchook.service \
                /etc/systemd/system/sockets.target.wants/synchook.socket
            systemd_running && systemctl daemon-reload
        fi
        if [ -f /etc/init.d/synchook ]; then
            init_script synchook stop >/dev/null 2>&1 || true
            rm -f /etc/init.d/synchook /etc/rc[0-6S].d/[SK][0-9][0-9]synchook
        fi
        if grep -q '^# BEGIN synchook ' /etc/rc.local 2>/dev/null; then
            old_pid=$(cat /run/synchook.pid 2>/dev/null)
            if [ -n "$old_pid" ]; then
                kill "$old_pid" 2>/dev/null || true
            fi
            sed -i '/^# BEGIN synchook /,/^# END synchook$/d' /etc/rc.local
        fi
        rm -f "$old_program"
        rm -rf "${old_program%/sbin/synchook}/lib/synchook"
    fi
    if [ -f /etc/synchook.conf ]; then
        echo "synchook: keeping the settings in /etc/synchook.conf"
        mv /etc/synchook.conf "$CARRIED"
    fi
    return 0
}

# After the unpack: the carried settings replace the package's closed default.
restore_carried_settings() {
    [ -f "$CARRIED" ] || return 0
    mv "$CARRIED" /etc/synchook.conf
    chmod 0600 /etc/synchook.conf
}

# Bytecode for this machine's python3, as install.sh makes it: the daemon runs
# from it with -B (nothing is ever written later).
compile_program() {
    rm -rf /usr/lib/synchook/__pycache__
    (umask 022 && python3 -I -S -c 'import py_compile; py_compile.compile("/usr/lib/synchook/synchook.py", doraise=True)') \
        || echo "synchook: no bytecode compiled: it runs from source (about 5 MB more memory)"
}

remove_bytecode() { rm -rf /usr/lib/synchook/__pycache__; }

# What install.sh --purge removes besides the config: the state dir (the
# generated certificate), the runtime dir unless a window's post phase is still
# owed there, the log file where there was no syslog.
purge_state() {
    rm -rf /var/lib/synchook
    rm -f /var/log/synchook.log /var/log/synchook.log.* /run/synchook.pid /run/synchook.start
    if [ -d /run/synchook ]; then
        marker_first=
        [ -f /run/synchook/window.json ] && { IFS= read -r marker_first </run/synchook/window.json || true; }
        if [ -n "$marker_first" ] || [ -L /run/synchook/window.json ]; then
            echo "synchook: kept /run/synchook: a window's post phase is owed (synchook recover)"
        else
            rm -rf /run/synchook
        fi
    fi
}
