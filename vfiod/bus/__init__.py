"""The D-Bus side of vfiod: the `org.hypeman.Devices1` service over the core manager.

names.py     the contract's fixed names (bus name, paths, interfaces, errors, polkit actions)
service.py   the Manager and device objects, the standard interfaces, dispatch and thread pools
authz.py     the method -> polkit action table, caller identity, polkit checks and their cache
errors.py    any failure -> org.hypeman.Devices1.Error.<name> (never a traceback)
variants.py  records <-> a{sv}, the option table, the Device properties
calls.py     outgoing calls (bounded below dbus-daemon's 128 pending replies)
systemd.py   units and modprobe@ through systemd, or the stand-ins without it
uevents.py   kernel bind/unbind uevents (netlink, or the simulator's uevents.jsonl)
logs.py      journal with structured fields, or stderr
daemon.py    `vfiod run`: start-up order, sd_notify, SIGHUP, SIGTERM
"""
