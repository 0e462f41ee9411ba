// Command workflow is the seed's workflow with the Go client: discover the GPUs, register one, attach it to
// an instance (first without its audio function, which the IOMMU group refuses, then with it), print what
// cloud-hypervisor takes, detach and unregister.
//
//	go run ./examples/workflow -address unix:path=/run/vfiod-demo/bus   # vfiod run --simulate ... --bus
//	go run ./examples/workflow                                          # the system bus
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/hypeman/vfiod/clients/go/vfiod"
)

func main() {
	address := flag.String("address", "", "a private bus address (default: the system bus)")
	instance := flag.String("instance", "vm-1", "the instance to attach the GPU to")
	flag.Parse()
	if err := run(*address, *instance); err != nil {
		fmt.Fprintln(os.Stderr, "workflow:", err)
		os.Exit(1)
	}
}

func run(address, instance string) error {
	c, err := vfiod.New(vfiod.Options{Address: address})
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// 1. discover
	available, err := c.ListAvailable(ctx, false)
	if err != nil {
		return err
	}
	var gpu *vfiod.AvailableDevice
	for i, d := range available {
		fmt.Printf("available: %s %s %s (driver %s, group %d, ready %v)\n",
			d.PCIAddress, d.VendorName, d.DeviceName, d.CurrentDriver, d.IOMMUGroup, d.PassthroughReady)
		if d.PassthroughReady && gpu == nil {
			gpu = &available[i]
		}
	}
	if gpu == nil {
		return errors.New("no GPU can be passed through on this host")
	}

	// 2. register
	dev, _, err := c.RegisterDevice(ctx, gpu.PCIAddress, "gpu-0", map[string]string{"pool": "example"})
	if errors.Is(err, vfiod.ErrAlreadyExists) || errors.Is(err, vfiod.ErrNameExists) {
		dev, err = c.GetDevice(ctx, "gpu-0")
	}
	if err != nil {
		return err
	}
	fmt.Printf("registered: %s as %s (state %s)\n", dev.PCIAddress, dev.Name, dev.State)

	// 3. attach: without the other functions of the slot the group cannot be handed over
	_, _, err = c.Attach(ctx, instance, []string{dev.Name}, vfiod.AttachOptions{})
	var refused *vfiod.Error
	if errors.As(err, &refused) && errors.Is(err, vfiod.ErrIOMMUGroupConflict) {
		fmt.Printf("attach without include_group: %s\n", refused.Name)
	} else if err != nil {
		return err
	}
	atts, warnings, err := c.Attach(ctx, instance, []string{dev.Name}, vfiod.AttachOptions{IncludeGroup: true})
	if err != nil {
		return err
	}
	for _, a := range atts {
		fmt.Printf("attached: %s (%s) %s -> cloud-hypervisor --device path=%s\n",
			a.PCIAddress, a.Role, a.VFIOGroupPath, a.DeviceConfig.Path)
	}
	for _, w := range warnings {
		fmt.Printf("warning: %s\n", w)
	}

	// 4. detach: both functions go back to their drivers
	if err := c.Detach(ctx, instance, nil, false); err != nil {
		return err
	}
	back, err := c.GetDevice(ctx, dev.Name)
	if err != nil {
		return err
	}
	fmt.Printf("detached: %s back on %s (state %s)\n", back.PCIAddress, back.Driver, back.State)
	if err := c.UnregisterDevice(ctx, dev.Name); err != nil {
		return err
	}
	fmt.Println("unregistered:", dev.Name)
	return nil
}
