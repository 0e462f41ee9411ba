// Package vfiod is a Go client of vfiod, the daemon that hands PCI devices, SR-IOV virtual functions and
// vGPUs to unprivileged VM managers over the system D-Bus (org.hypeman.Devices1).
//
// Every method of org.hypeman.Devices1.Manager is a method of Client, taking a context (its deadline is
// the call's; DefaultTimeout when it has none) and returning typed records: AvailableDevice, Device,
// HostStatus, Attachment, Profile, VGPU and Report carry every key of the contract's records, and keys a
// newer vfiod adds are ignored (Options.Strict turns them into an error, for tests). Failures the daemon
// answers are *Error values whose Name is the contract's error name; errors.Is matches them against the
// sentinels (errors.Is(err, vfiod.ErrInUse)). Transport failures and context deadlines are returned as
// godbus and the context package give them.
//
// WatchDevices reports registered devices appearing, changing and disappearing (the ObjectManager and
// PropertiesChanged signals of the device objects).
//
// The seed's workflow (discover, register, attach, detach) is Example_workflow. A daemon on a private bus
// (vfiod run --simulate PROFILE --bus ADDRESS) is reached with Options.Address.
package vfiod
