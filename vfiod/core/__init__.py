"""Pure-Python device logic: discovery, binding, guards, registry and manager. No D-Bus here."""
