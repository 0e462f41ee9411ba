package vfiod

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"
)

// These tests call a live vfiod: VFIOD_TEST_BUS is the address of a private bus where `vfiod run
// --simulate workstation-l4` (VFIOD_TEST_PROFILE, mdev-samples for the vGPU test) answers. The suite's
// tests/integration/test_go_client.py starts it with the real dbus-daemon and polkitd and runs them.

const gpu, audio = "0000:a2:00.0", "0000:a2:00.1" // the simulated workstation's NVIDIA L4 and its audio

func live(t *testing.T, profile string) *Client {
	t.Helper()
	address := os.Getenv("VFIOD_TEST_BUS")
	if address == "" || os.Getenv("VFIOD_TEST_PROFILE") != profile {
		t.Skipf("needs vfiod --simulate %s on VFIOD_TEST_BUS", profile)
	}
	c, err := New(Options{Address: address, Strict: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func asRoot(t *testing.T) {
	t.Helper()
	if os.Getuid() != 0 || os.Getenv("VFIOD_TEST_EXPECT_DENIED") != "" {
		t.Skip("runs as root")
	}
}

func TestRecordsCarryEveryKeyOfTheContract(t *testing.T) {
	c := live(t, "workstation-l4")
	asRoot(t)
	ctx := context.Background()
	avail, err := c.ListAvailable(ctx, true) // strict: an unknown or missing key fails
	if err != nil {
		t.Fatal(err)
	}
	var found *AvailableDevice
	for i := range avail {
		if avail[i].PCIAddress == gpu {
			found = &avail[i]
		}
	}
	if found == nil || found.Type != "gpu" || !found.PassthroughReady || found.IOMMUGroup < 0 {
		t.Fatalf("the L4 in ListAvailable: %+v", found)
	}
	status, err := c.GetHostStatus(ctx)
	if err != nil || !status.IOMMUEnabled || status.GPUMode != "passthrough" {
		t.Fatalf("GetHostStatus: %+v, %v", status, err)
	}
	dev, path, err := c.RegisterDevice(ctx, gpu, "go-gpu", map[string]string{"pool": "go"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.UnregisterDevice(context.Background(), "go-gpu") })
	if dev.Name != "go-gpu" || dev.State != "host" || dev.OwnerUID != NoOwner || path != dev.ObjectPath {
		t.Fatalf("RegisterDevice: %+v at %s", dev, path)
	}
	atts, warnings, err := c.Attach(ctx, "vm-go", []string{"go-gpu"}, AttachOptions{IncludeGroup: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Detach(context.Background(), "vm-go", nil, false) })
	if len(atts) != 2 || atts[0].PCIAddress != gpu || atts[1].PCIAddress != audio || !atts[0].Changed {
		t.Fatalf("Attach: %+v", atts)
	}
	if atts[0].DeviceConfig.Path != "/sys/bus/pci/devices/"+gpu+"/" || atts[0].DeviceConfig.XNvGpudirectClique != nil {
		t.Fatalf("DeviceConfig: %+v", atts[0].DeviceConfig)
	}
	if len(warnings) == 0 {
		t.Fatal("no warnings (the simulated host has no /dev/kvm)")
	}
	again, _, err := c.Attach(ctx, "vm-go", []string{"go-gpu"}, AttachOptions{IncludeGroup: true})
	if err != nil || again[0].Changed {
		t.Fatalf("the idempotent Attach: %+v, %v", again, err)
	}
	got, err := c.GetDevice(ctx, "go-gpu")
	if err != nil || got.State != "attached" || got.AttachedTo != "vm-go" || got.OwnerUID != 0 {
		t.Fatalf("GetDevice: %+v, %v", got, err)
	}
	tagged, err := c.ListDevices(ctx, map[string]string{"pool": "go"})
	if err != nil || len(tagged) != 1 || tagged[0].ID != dev.ID {
		t.Fatalf("ListDevices by tag: %+v, %v", tagged, err)
	}
	report, err := c.Reconcile(ctx, []string{"vm-go"}, ReconcileOptions{DryRun: true})
	if err != nil || report.Counters["kept"] != 2 {
		t.Fatalf("Reconcile: %+v, %v", report, err)
	}
	if err := c.Detach(ctx, "vm-go", nil, false); err != nil {
		t.Fatal(err)
	}
	metrics, err := c.Metrics(ctx)
	if err != nil || !strings.Contains(metrics, `vfiod_calls_total{method="Attach",result="ok"} `) {
		t.Fatalf("Metrics: %v\n%s", err, metrics)
	}
	version, err := c.Version(ctx)
	if err != nil || version == "" {
		t.Fatalf("Version: %q, %v", version, err)
	}
}

func TestErrorsMatchTheContractNames(t *testing.T) {
	c := live(t, "workstation-l4")
	asRoot(t)
	ctx := context.Background()
	_, err := c.GetDevice(ctx, "no-such-device")
	var e *Error
	if !errors.Is(err, ErrNotFound) || errors.Is(err, ErrInUse) || !errors.As(err, &e) || e.Message == "" {
		t.Fatalf("GetDevice of an unknown name: %#v", err)
	}
	if _, _, err := c.RegisterDevice(ctx, "a2:00.0", "", nil); !errors.Is(err, ErrInvalidPCIAddress) {
		t.Fatalf("RegisterDevice of a short address: %v", err)
	}
	if _, _, err := c.RegisterDevice(ctx, gpu, "go-conflict", nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.UnregisterDevice(context.Background(), "go-conflict") })
	_, _, err = c.Attach(ctx, "vm-go2", []string{"go-conflict"}, AttachOptions{})
	if !errors.Is(err, ErrIOMMUGroupConflict) || !strings.Contains(err.Error(), audio) {
		t.Fatalf("Attach without the audio: %v", err)
	}
	if LeavesDeviceStuck(err) || !LeavesDeviceStuck(&Error{Name: "Timeout"}) {
		t.Fatal("LeavesDeviceStuck")
	}
	if HTTPStatus(err) != 409 || HTTPStatus(&Error{Name: "NotFound"}) != 404 || HTTPStatus(nil) != 200 {
		t.Fatal("HTTPStatus")
	}
	if HTTPStatus(context.DeadlineExceeded) != 500 || HTTPStatus(ErrBusy) != 503 {
		t.Fatal("HTTPStatus of a transport error or Busy")
	}
	if len(Errors) != 26 {
		t.Fatalf("%d sentinels", len(Errors))
	}
}

func TestTheContextDeadlineIsTheCallsDeadline(t *testing.T) {
	c := live(t, "workstation-l4")
	ctx, cancel := context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel()
	time.Sleep(time.Millisecond)
	if _, err := c.ListAvailable(ctx, true); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("an expired context: %v", err)
	}
}

func TestWatchDevicesReportsAddedChangedRemoved(t *testing.T) {
	c := live(t, "workstation-l4")
	asRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	events, err := c.WatchDevices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dev, _, err := c.RegisterDevice(ctx, gpu, "go-watched", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Attach(ctx, "vm-watch", []string{"go-watched"}, AttachOptions{IncludeGroup: true}); err != nil {
		t.Fatal(err)
	}
	if err := c.Detach(ctx, "vm-watch", nil, false); err != nil {
		t.Fatal(err)
	}
	if err := c.UnregisterDevice(ctx, "go-watched"); err != nil {
		t.Fatal(err)
	}
	seen := map[EventKind]bool{}
	attached := false
	for !(seen[DeviceAdded] && attached && seen[DeviceRemoved]) {
		select {
		case ev := <-events:
			if ev.ID != dev.ID {
				continue // the audio function, registered as its companion
			}
			seen[ev.Kind] = true
			if s, ok := ev.Properties["State"]; ok && ev.Kind == DeviceChanged && s.Value() == "attached" {
				attached = true
			}
		case <-ctx.Done():
			t.Fatalf("events seen for %s: %v, attached %v", dev.ID, seen, attached)
		}
	}
}

func TestVGPUs(t *testing.T) {
	c := live(t, "mdev-samples-iommufd")
	asRoot(t)
	ctx := context.Background()
	profiles, err := c.ListProfiles(ctx, "")
	if err != nil || len(profiles) == 0 {
		t.Fatalf("ListProfiles: %+v, %v", profiles, err)
	}
	att, _, err := c.AttachVGPU(ctx, "vm-vgpu", "mtty-2", AttachVGPUOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(att.SysfsPath, "/sys/bus/mdev/devices/") || att.VFIOGroupPath == "" {
		t.Fatalf("AttachVGPU: %+v", att)
	}
	vgpus, err := c.ListVGPUs(ctx, "vm-vgpu")
	if err != nil || len(vgpus) != 1 || !vgpus[0].Managed || vgpus[0].InstanceID != "vm-vgpu" {
		t.Fatalf("ListVGPUs: %+v, %v", vgpus, err)
	}
	if err := c.Detach(ctx, "vm-vgpu", nil, false); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.AttachVGPU(ctx, "vm-vgpu", "no-such-profile", AttachVGPUOptions{}); !errors.Is(err, ErrProfileNotFound) {
		t.Fatalf("AttachVGPU of an unknown profile: %v", err)
	}
	// an mdev by descriptor: asked for with Handoff "fd", opened only with AllowMdev
	fd, _, err := c.AttachVGPU(ctx, "vm-vgpu-fd", "mtty-1", AttachVGPUOptions{Handoff: "fd"})
	if err != nil || fd.Handoff != "fd" || fd.VFIOGroupPath != "" || !strings.HasPrefix(fd.VFIOCdevPath, "/dev/vfio/devices/") {
		t.Fatalf("AttachVGPU with Handoff fd: %+v, %v", fd, err)
	}
	t.Cleanup(func() { _ = c.Detach(context.Background(), "vm-vgpu-fd", nil, false) })
	if _, _, _, err := c.OpenDevices(ctx, "vm-vgpu-fd", nil, OpenDevicesOptions{}); !errors.Is(err, ErrHandoffUnsupported) {
		t.Fatalf("OpenDevices of an mdev without AllowMdev: %v", err)
	}
	iommufd, devs, warnings, err := c.OpenDevices(ctx, "vm-vgpu-fd", nil, OpenDevicesOptions{AllowMdev: true})
	if err != nil || len(devs) != 1 || devs[0].SysfsPath != fd.SysfsPath || len(warnings) == 0 {
		t.Fatalf("OpenDevices with AllowMdev: %+v %v, %v", devs, warnings, err)
	}
	defer iommufd.Close()
	defer devs[0].Cdev.Close()
	got, err1 := devs[0].Cdev.Stat()
	want, err2 := os.Stat(os.Getenv("VFIOD_TEST_ROOT") + fd.VFIOCdevPath)
	if err1 != nil || err2 != nil || !os.SameFile(got, want) {
		t.Fatalf("%s: %v %v %v", fd.VFIOCdevPath, got, err1, err2)
	}
}

func TestOpenDevices(t *testing.T) {
	c := live(t, "qemu-q35-iommufd")
	asRoot(t)
	ctx := context.Background()
	if _, _, err := c.RegisterDevice(ctx, "0000:00:07.0", "go-edu", nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.UnregisterDevice(context.Background(), "go-edu") })
	atts, _, err := c.Attach(ctx, "vm-fd", []string{"go-edu"}, AttachOptions{Handoff: "fd"})
	if err != nil || len(atts) != 1 || atts[0].Handoff != "fd" || atts[0].VFIOGroupPath != "" ||
		!strings.HasPrefix(atts[0].VFIOCdevPath, "/dev/vfio/devices/vfio") {
		t.Fatalf("Attach with Handoff fd: %+v, %v", atts, err)
	}
	t.Cleanup(func() { _ = c.Detach(context.Background(), "vm-fd", nil, false) })
	iommufd, devs, _, err := c.OpenDevices(ctx, "vm-fd", nil, OpenDevicesOptions{})
	if err != nil || len(devs) != 1 || devs[0].ID != atts[0].ID || devs[0].SysfsPath != atts[0].SysfsPath {
		t.Fatalf("OpenDevices: %+v, %v", devs, err)
	}
	defer iommufd.Close()
	defer devs[0].Cdev.Close()
	// the files are the daemon's nodes (its simulated tree, as VFIOD_TEST_ROOT names it)
	root := os.Getenv("VFIOD_TEST_ROOT")
	for f, node := range map[*os.File]string{iommufd: "/dev/iommu", devs[0].Cdev: atts[0].VFIOCdevPath} {
		got, err1 := f.Stat()
		want, err2 := os.Stat(root + node)
		if err1 != nil || err2 != nil || !os.SameFile(got, want) {
			t.Fatalf("%s: %v %v %v", node, got, err1, err2)
		}
	}
	if _, _, _, err := c.OpenDevices(ctx, "vm-none", nil, OpenDevicesOptions{}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("OpenDevices of an instance with nothing attached: %v", err)
	}
}

func TestDenied(t *testing.T) {
	c := live(t, "workstation-l4")
	if os.Getenv("VFIOD_TEST_EXPECT_DENIED") == "" {
		t.Skip("runs as a user polkit refuses (VFIOD_TEST_EXPECT_DENIED=1)")
	}
	_, _, err := c.RegisterDevice(context.Background(), gpu, "go-denied", nil)
	if !errors.Is(err, ErrNotAuthorized) {
		t.Fatalf("RegisterDevice by uid %d: %v", os.Getuid(), err)
	}
	if _, err := c.ListAvailable(context.Background(), false); err != nil {
		t.Fatalf("inspect is anyone's: %v", err)
	}
}
