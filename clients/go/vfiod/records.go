package vfiod

import "github.com/godbus/dbus/v5"

// The contract's records, one field per key (the `vfiod` tag is the key; ",optional" marks a key the
// daemon sends only sometimes). An empty string or -1 means none; OwnerUID is NoOwner when not attached.

// NoOwner is the owner_uid of a device or vGPU that is not attached.
const NoOwner = 4294967295

// AvailableDevice is a PCI function of the host that could be passed through (ListAvailable).
type AvailableDevice struct {
	PCIAddress        string   `vfiod:"pci_address"`
	VendorID          string   `vfiod:"vendor_id"`
	DeviceID          string   `vfiod:"device_id"`
	SubsystemVendorID string   `vfiod:"subsystem_vendor_id"`
	SubsystemDeviceID string   `vfiod:"subsystem_device_id"`
	Class             string   `vfiod:"class"`
	VendorName        string   `vfiod:"vendor_name"`
	DeviceName        string   `vfiod:"device_name"`
	Type              string   `vfiod:"type"` // gpu or pci
	IOMMUGroup        int32    `vfiod:"iommu_group"`
	IOMMUGroupMembers []string `vfiod:"iommu_group_members"`
	CurrentDriver     string   `vfiod:"current_driver"`
	NUMANode          int32    `vfiod:"numa_node"`
	BootVGA           bool     `vfiod:"boot_vga"`
	ResetMethods      []string `vfiod:"reset_methods"`
	RegisteredAs      string   `vfiod:"registered_as"` // the device id, or empty
	HostCritical      string   `vfiod:"host_critical"` // why the host needs it, or empty
	PassthroughReady  bool     `vfiod:"passthrough_ready"`
	Blockers          []string `vfiod:"blockers"`
	SriovTotalVFs     uint32   `vfiod:"sriov_totalvfs"`
	SriovNumVFs       uint32   `vfiod:"sriov_numvfs"`
	PhysFn            string   `vfiod:"physfn"`
	VirtFns           []string `vfiod:"virtfns"`
	MdevTypes         []string `vfiod:"mdev_types"`
	VariantDriver     string   `vfiod:"variant_driver"`
}

// Device is a registered device or a vGPU vfiod created (ListDevices, GetDevice, RegisterDevice).
type Device struct {
	ID                string            `vfiod:"id"`
	Name              string            `vfiod:"name"`
	Type              string            `vfiod:"type"` // gpu, pci or vgpu
	PCIAddress        string            `vfiod:"pci_address"`
	VendorID          string            `vfiod:"vendor_id"`
	DeviceID          string            `vfiod:"device_id"`
	SubsystemVendorID string            `vfiod:"subsystem_vendor_id"`
	SubsystemDeviceID string            `vfiod:"subsystem_device_id"`
	VendorName        string            `vfiod:"vendor_name"`
	DeviceName        string            `vfiod:"device_name"`
	IOMMUGroup        int32             `vfiod:"iommu_group"`
	BoundToVFIO       bool              `vfiod:"bound_to_vfio"`
	Driver            string            `vfiod:"driver"`
	NativeDriver      string            `vfiod:"native_driver"`
	State             string            `vfiod:"state"` // host, binding, vfio, attached, releasing, stuck, missing
	AttachedTo        string            `vfiod:"attached_to"`
	OwnerUID          uint32            `vfiod:"owner_uid"`
	CreatedAt         string            `vfiod:"created_at"` // RFC 3339, UTC
	SysfsPath         string            `vfiod:"sysfs_path"`
	VFIOGroupPath     string            `vfiod:"vfio_group_path"`
	Tags              map[string]string `vfiod:"tags"`
	ObjectPath        dbus.ObjectPath   `vfiod:"object_path"`
}

// Claim is another tool's claim on devices (HostStatus.Claims): a modprobe.d option, driverctl, ...
type Claim struct {
	Kind    string   `vfiod:"kind"`
	Source  string   `vfiod:"source"`
	Text    string   `vfiod:"text"`
	Driver  string   `vfiod:"driver"`
	Devices []string `vfiod:"devices"`
	Note    string   `vfiod:"note"`
}

// HostStatus says whether the host is ready for VFIO passthrough (GetHostStatus).
type HostStatus struct {
	IOMMUEnabled         bool     `vfiod:"iommu_enabled"`
	IOMMUGroups          uint32   `vfiod:"iommu_groups"`
	VFIOPCILoaded        bool     `vfiod:"vfio_pci_loaded"`
	VFIOContainer        bool     `vfiod:"vfio_container"`
	VFIOCdev             bool     `vfiod:"vfio_cdev"`
	IOMMUFD              bool     `vfiod:"iommufd"`
	InterruptRemapping   bool     `vfiod:"interrupt_remapping"`
	Hugepages2M          uint32   `vfiod:"hugepages_2m"`
	GPUMode              string   `vfiod:"gpu_mode"` // passthrough, vgpu or none
	GPUSlotsTotal        uint32   `vfiod:"gpu_slots_total"`
	GPUSlotsUsed         uint32   `vfiod:"gpu_slots_used"`
	VGPUParents          uint32   `vfiod:"vgpu_parents"`
	VGPUSlotsTotal       uint32   `vfiod:"vgpu_slots_total"`
	VGPUSlotsUsed        uint32   `vfiod:"vgpu_slots_used"`
	VGPUSlotsAllocatable uint32   `vfiod:"vgpu_slots_allocatable"`
	Quarantined          []string `vfiod:"quarantined"`
	Problems             []string `vfiod:"problems"`
	Notes                []string `vfiod:"notes"`
	Claims               []Claim  `vfiod:"claims"`
}

// DeviceConfig is how a VMM takes the function: Path for cloud-hypervisor's --device path= (its
// DeviceConfig); for a vGPU also Sysfsdev for QEMU's -device vfio-pci,sysfsdev= and its UUID.
type DeviceConfig struct {
	Path               string `vfiod:"path"`
	XNvGpudirectClique *uint8 `vfiod:"x_nv_gpudirect_clique,optional"` // only when asked for
	Sysfsdev           string `vfiod:"sysfsdev,optional"`              // vGPUs only
	UUID               string `vfiod:"uuid,optional"`                  // vGPUs only
}

// Attachment is one function (or vGPU) handed to an instance (Attach, AttachVGPU).
type Attachment struct {
	ID            string       `vfiod:"id"`
	PCIAddress    string       `vfiod:"pci_address"`
	Role          string       `vfiod:"role"` // requested or companion
	SysfsPath     string       `vfiod:"sysfs_path"`
	VFIOGroupPath string       `vfiod:"vfio_group_path"`         // /dev/vfio/N, now the owner's (mode 0600); "" in fd mode
	VFIOCdevPath  string       `vfiod:"vfio_cdev_path,optional"` // fd mode: /dev/vfio/devices/vfioN (root's)
	Handoff       string       `vfiod:"handoff,optional"`        // node or fd
	IOMMUGroup    int32        `vfiod:"iommu_group"`
	DeviceConfig  DeviceConfig `vfiod:"device_config"`
	Changed       bool         `vfiod:"changed"` // false for the idempotent repeat of an earlier Attach
}

// Profile is a vGPU type the host offers (ListProfiles).
type Profile struct {
	Name          string   `vfiod:"name"`
	TypeID        string   `vfiod:"type_id"`
	Framework     string   `vfiod:"framework"` // mdev or vendor-vfio
	FramebufferMB uint32   `vfiod:"framebuffer_mb"`
	Description   string   `vfiod:"description"`
	DeviceAPI     string   `vfiod:"device_api"`
	Available     uint32   `vfiod:"available"`
	Parents       []string `vfiod:"parents"`
}

// VGPU is a vGPU on the host, created by vfiod (Managed) or not (ListVGPUs).
type VGPU struct {
	ID            string `vfiod:"id"`
	UUID          string `vfiod:"uuid"`
	Framework     string `vfiod:"framework"`
	Profile       string `vfiod:"profile"`
	TypeID        string `vfiod:"type_id"`
	Parent        string `vfiod:"parent"`
	PhysicalGPU   string `vfiod:"physical_gpu"`
	InstanceID    string `vfiod:"instance_id"`
	OwnerUID      uint32 `vfiod:"owner_uid"`
	SysfsPath     string `vfiod:"sysfs_path"`
	VFIOGroupPath string `vfiod:"vfio_group_path"`
	State         string `vfiod:"state"`
	Managed       bool   `vfiod:"managed"`
	CreatedAt     string `vfiod:"created_at"`
}

// Report is what Reconcile, Recover and ImportHypeman did: counters by name, and one sentence per finding.
type Report struct {
	Counters map[string]uint32
	Findings []string
}
