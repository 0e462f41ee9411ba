"""The D-Bus side of vfiod: the `org.hypeman.Devices1` service over the core manager.

names.py     the contract's fixed names (bus name, paths, interfaces, errors, polkit actions)
methods.py   each Manager method once: arguments, options, polkit action, admin options, adapter
requests.py  a call's arguments checked once and the devices it names resolved for polkit
adapters.py  what each method does once authorized: the core call and its answer
call.py      one call: who made it, its polkit checks (the admin one from a worker thread), audit
service.py   dispatch of the generated Manager interface and the standard interfaces, the pools
objects.py   the device objects: their properties, kept current, and their signals
standard.py  the standard interfaces' signatures, introspection data and machine id
authz.py     the polkit action table (Manager part from methods.py), caller identity, checks, cache
errors.py    any failure -> org.hypeman.Devices1.Error.<name> (never a traceback)
variants.py  records <-> a{sv}, option checking, the Device properties
calls.py     outgoing calls (bounded below dbus-daemon's 128 pending replies)
systemd.py   units and modprobe@ through systemd, or the stand-ins without it
uevents.py   kernel bind/unbind uevents (netlink, or the simulator's uevents.jsonl)
logs.py      journal with structured fields, or stderr
daemon.py    `vfiod run`: start-up order, sd_notify, SIGHUP, SIGTERM
"""
