"""The operations that change a device's binding: `attach` (bind, grant, record, or roll all of it back)
and `release` (detach, unbind, unregister and recover through one restore path), with `settle`, what every
failure ends with. Each takes the `CoreDeps` and runs under the group locks the manager holds."""
