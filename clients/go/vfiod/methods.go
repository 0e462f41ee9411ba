package vfiod

import (
	"context"
	"os"

	"github.com/godbus/dbus/v5"
)

// One method per Manager method, in the contract's order; its documentation is the XML's
// (/usr/share/dbus-1/interfaces/org.hypeman.Devices1.xml). Options are Go structs; their zero value sends
// nothing (the daemon's defaults).

// ListAvailable lists the PCI functions that could be passed through: display and 3D controllers, or
// every function when all is true.
func (c *Client) ListAvailable(ctx context.Context, all bool) ([]AvailableDevice, error) {
	var recs []map[string]dbus.Variant
	if err := c.call(ctx, "ListAvailable", []interface{}{&recs}, options{}.flag("all", all)); err != nil {
		return nil, err
	}
	return decodeRecords[AvailableDevice](recs, c.opts.Strict)
}

// ListDevices lists the registered devices (and vGPUs vfiod created) carrying all of tags (nil: all).
func (c *Client) ListDevices(ctx context.Context, tags map[string]string) ([]Device, error) {
	opts := options{}
	if len(tags) > 0 {
		opts["tags"] = dbus.MakeVariant(tags)
	}
	var recs []map[string]dbus.Variant
	if err := c.call(ctx, "ListDevices", []interface{}{&recs}, opts); err != nil {
		return nil, err
	}
	return decodeRecords[Device](recs, c.opts.Strict)
}

// GetDevice returns one registered device or vGPU by id or name.
func (c *Client) GetDevice(ctx context.Context, idOrName string) (Device, error) {
	var rec map[string]dbus.Variant
	var d Device
	if err := c.call(ctx, "GetDevice", []interface{}{&rec}, idOrName, options{}); err != nil {
		return d, err
	}
	return d, decodeRecord(rec, &d, c.opts.Strict)
}

// GetHostStatus says whether the host is ready for passthrough, and how many GPU and vGPU slots it has.
func (c *Client) GetHostStatus(ctx context.Context) (HostStatus, error) {
	var rec map[string]dbus.Variant
	var s HostStatus
	if err := c.call(ctx, "GetHostStatus", []interface{}{&rec}, options{}); err != nil {
		return s, err
	}
	return s, decodeRecord(rec, &s, c.opts.Strict)
}

// RegisterDevice registers the PCI function at pciAddress (dddd:bb:ss.f) as name (empty:
// pci-dddd-bb-ss-f), with tags; it returns the device and its object path.
func (c *Client) RegisterDevice(
	ctx context.Context, pciAddress, name string, tags map[string]string,
) (Device, dbus.ObjectPath, error) {
	var path dbus.ObjectPath
	var rec map[string]dbus.Variant
	var d Device
	opts := options{}
	if len(tags) > 0 {
		opts["tags"] = dbus.MakeVariant(tagMap(tags))
	}
	if err := c.call(ctx, "RegisterDevice", []interface{}{&path, &rec}, pciAddress, name, opts); err != nil {
		return d, "", err
	}
	return d, path, decodeRecord(rec, &d, c.opts.Strict)
}

// UnregisterDevice forgets a device that is not attached (and the companions registered with it).
func (c *Client) UnregisterDevice(ctx context.Context, idOrName string) error {
	return c.call(ctx, "UnregisterDevice", nil, idOrName, options{})
}

// AttachOptions are Attach's options.
type AttachOptions struct {
	IncludeGroup    bool    // also bind the other functions of the slot (a GPU's audio)
	OwnerUID        *uint32 // admin: attach for another uid (default: the caller's)
	GPUDirectClique *uint8  // add x_nv_gpudirect_clique to each DeviceConfig
	Force           bool    // admin: override HostCritical
	// Handoff is "node" (the group node is given to the owner), "fd" (no node changes owner; OpenDevices
	// hands over descriptors) or "" for the daemon's default (handoff in vfiod.toml).
	Handoff string
}

// Attach binds the devices (ids or names) for the instance and hands their group nodes to the owner. It
// is idempotent: call it on create and before every start. The warnings say what the VMM still needs.
func (c *Client) Attach(
	ctx context.Context, instanceID string, devices []string, o AttachOptions,
) ([]Attachment, []string, error) {
	opts := options{}.flag("include_group", o.IncludeGroup).flag("force", o.Force)
	if o.OwnerUID != nil {
		opts["owner_uid"] = dbus.MakeVariant(*o.OwnerUID)
	}
	if o.GPUDirectClique != nil {
		opts["gpudirect_clique"] = dbus.MakeVariant(*o.GPUDirectClique)
	}
	if o.Handoff != "" {
		opts["handoff"] = dbus.MakeVariant(o.Handoff)
	}
	var recs []map[string]dbus.Variant
	var warnings []string
	if err := c.call(ctx, "Attach", []interface{}{&recs, &warnings}, instanceID, strv(devices), opts); err != nil {
		return nil, nil, err
	}
	atts, err := decodeRecords[Attachment](recs, c.opts.Strict)
	return atts, warnings, err
}

// Detach gives the instance's devices back (all of them when devices is empty); keepBound leaves them on
// vfio-pci. An unknown or already detached instance succeeds.
func (c *Client) Detach(ctx context.Context, instanceID string, devices []string, keepBound bool) error {
	return c.call(ctx, "Detach", nil, instanceID, strv(devices), options{}.flag("keep_bound", keepBound))
}

// BindOptions are Bind's options.
type BindOptions struct {
	IncludeGroup bool
	Force        bool
	Exclusive    bool // ErrAlreadyBound if it is already on vfio
}

// Bind (admin) binds a registered device to vfio-pci without attaching it.
func (c *Client) Bind(ctx context.Context, idOrName string, o BindOptions) error {
	opts := options{}.flag("include_group", o.IncludeGroup).flag("force", o.Force).flag("exclusive", o.Exclusive)
	return c.call(ctx, "Bind", nil, idOrName, opts)
}

// Unbind (admin) returns a registered device that is not attached to its native driver; exclusive:
// ErrNotBound if it is not on vfio.
func (c *Client) Unbind(ctx context.Context, idOrName string, exclusive bool) error {
	return c.call(ctx, "Unbind", nil, idOrName, options{}.flag("exclusive", exclusive))
}

// ReconcileOptions are Reconcile's options.
type ReconcileOptions struct {
	DryRun   bool
	AllUsers bool // admin: every user's attachments, not only the caller's
}

// Reconcile releases the caller's attachments whose instance is not in live (hypeman calls it at start
// with every instance it knows) and reports what disagrees between the registry and the kernel.
func (c *Client) Reconcile(ctx context.Context, live []string, o ReconcileOptions) (Report, error) {
	var rec map[string]dbus.Variant
	opts := options{}.flag("dry_run", o.DryRun).flag("all_users", o.AllUsers)
	if err := c.call(ctx, "Reconcile", []interface{}{&rec}, strv(live), opts); err != nil {
		return Report{}, err
	}
	return decodeReport(rec, c.opts.Strict)
}

// Recover (admin) puts stuck or driverless devices back (target "": all of them), clears a vGPU parent's
// quarantine, or cycles SR-IOV on a GPU whose VFs host vGPUs.
func (c *Client) Recover(ctx context.Context, target string, dryRun bool) (Report, error) {
	var rec map[string]dbus.Variant
	if err := c.call(ctx, "Recover", []interface{}{&rec}, target, options{}.flag("dry_run", dryRun)); err != nil {
		return Report{}, err
	}
	return decodeReport(rec, c.opts.Strict)
}

// ListProfiles lists the vGPU types the host offers (only parent's when given).
func (c *Client) ListProfiles(ctx context.Context, parent string) ([]Profile, error) {
	var recs []map[string]dbus.Variant
	if err := c.call(ctx, "ListProfiles", []interface{}{&recs}, options{}.str("parent", parent)); err != nil {
		return nil, err
	}
	return decodeRecords[Profile](recs, c.opts.Strict)
}

// ListVGPUs lists every vGPU on the host (only the instance's when given).
func (c *Client) ListVGPUs(ctx context.Context, instanceID string) ([]VGPU, error) {
	var recs []map[string]dbus.Variant
	if err := c.call(ctx, "ListVGPUs", []interface{}{&recs}, options{}.str("instance", instanceID)); err != nil {
		return nil, err
	}
	return decodeRecords[VGPU](recs, c.opts.Strict)
}

// AttachVGPUOptions are AttachVGPU's options.
type AttachVGPUOptions struct {
	Parent   string  // pin the parent (default: the least loaded that offers the profile)
	UUID     string  // the vGPU's UUID (default: a new one)
	OwnerUID *uint32 // admin: for another uid
	// Handoff is "node" or "fd" as for Attach; default: the host's for a vendor-VFIO vGPU, "node" for an
	// mdev (QEMU recognises an mdev only by its sysfsdev= path).
	Handoff string
}

// AttachVGPU creates a vGPU of the profile (name or type id) for the instance and hands it over.
func (c *Client) AttachVGPU(
	ctx context.Context, instanceID, profile string, o AttachVGPUOptions,
) (Attachment, []string, error) {
	opts := options{}.str("parent", o.Parent).str("uuid", o.UUID).str("handoff", o.Handoff)
	if o.OwnerUID != nil {
		opts["owner_uid"] = dbus.MakeVariant(*o.OwnerUID)
	}
	var rec map[string]dbus.Variant
	var warnings []string
	var a Attachment
	if err := c.call(ctx, "AttachVGPU", []interface{}{&rec, &warnings}, instanceID, profile, opts); err != nil {
		return a, nil, err
	}
	return a, warnings, decodeRecord(rec, &a, c.opts.Strict)
}

// SetVirtualFunctions (admin) enables count SR-IOV VFs on the physical function pf (0 disables them) and
// returns their PCI addresses; autoprobe lets host drivers probe them.
func (c *Client) SetVirtualFunctions(ctx context.Context, pf string, count uint32, autoprobe bool) ([]string, error) {
	var vfs []string
	err := c.call(ctx, "SetVirtualFunctions", []interface{}{&vfs}, pf, count, options{}.flag("autoprobe", autoprobe))
	return vfs, err
}

// OpenedDevice is one device of an OpenDevices reply: its id, sysfs path and an open descriptor of its
// VFIO device cdev (/dev/vfio/devices/vfioN).
type OpenedDevice struct {
	ID        string
	SysfsPath string
	Cdev      *os.File
}

// OpenDevicesOptions are OpenDevices' options.
type OpenDevicesOptions struct {
	// AllowMdev hands over an fd-mode mdev's cdev too; QEMU needs its sysfsdev= path beside fd=.
	AllowMdev bool
}

// OpenDevices opens, in vfiod, a new /dev/iommu and each VFIO device cdev of the instance's devices
// attached with Handoff "fd" (all of them when devices is empty) and returns the descriptors. The caller
// owns the files: hand them to the VMM (exec.Cmd.ExtraFiles; QEMU: -object iommufd,id=i0,fd=N -device
// vfio-pci,fd=M,iommufd=i0) and close its copies. The warnings say what the VMM still needs.
func (c *Client) OpenDevices(
	ctx context.Context, instanceID string, devices []string, o OpenDevicesOptions,
) (*os.File, []OpenedDevice, []string, error) {
	var iommufd dbus.UnixFD
	var devs []struct {
		ID        string
		SysfsPath string
		FD        dbus.UnixFD
	}
	var warnings []string
	err := c.call(ctx, "OpenDevices", []interface{}{&iommufd, &devs, &warnings}, instanceID, strv(devices),
		options{}.flag("allow_mdev", o.AllowMdev))
	if err != nil {
		return nil, nil, nil, err
	}
	opened := make([]OpenedDevice, len(devs))
	for i, d := range devs {
		opened[i] = OpenedDevice{ID: d.ID, SysfsPath: d.SysfsPath, Cdev: os.NewFile(uintptr(d.FD), d.SysfsPath)}
	}
	return os.NewFile(uintptr(iommufd), "/dev/iommu"), opened, warnings, nil
}

// ImportHypeman (admin) imports the devices hypeman's Go code registered under dataDir.
func (c *Client) ImportHypeman(ctx context.Context, dataDir string) (Report, error) {
	var rec map[string]dbus.Variant
	if err := c.call(ctx, "ImportHypeman", []interface{}{&rec}, dataDir, options{}); err != nil {
		return Report{}, err
	}
	return decodeReport(rec, c.opts.Strict)
}

// Metrics returns the daemon's Prometheus metrics in the text exposition format (GetMetrics).
func (c *Client) Metrics(ctx context.Context) (string, error) {
	var text string
	err := c.call(ctx, "GetMetrics", []interface{}{&text}, options{})
	return text, err
}
