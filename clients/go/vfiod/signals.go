package vfiod

import (
	"context"
	"path"
	"strings"

	"github.com/godbus/dbus/v5"
)

// DevicesPath is where the registered devices' objects live (one per device, named by its id).
const DevicesPath = dbus.ObjectPath("/org/hypeman/Devices1/devices")

// EventKind says what happened to a registered device.
type EventKind string

const (
	DeviceAdded   EventKind = "added"   // registered (or vfiod started and published it)
	DeviceChanged EventKind = "changed" // a property changed: state, driver, attached_to, ...
	DeviceRemoved EventKind = "removed" // unregistered
)

// DeviceEvent is one change of a registered device. Properties are the Device object's (CamelCase names
// such as State, Driver, AttachedTo): all of them when added, the changed ones when changed.
type DeviceEvent struct {
	Kind       EventKind
	ID         string
	Path       dbus.ObjectPath
	Properties map[string]dbus.Variant
}

// WatchDevices reports device changes until ctx is done, then closes the channel. It subscribes before
// returning, so a change made after it returns is reported.
func (c *Client) WatchDevices(ctx context.Context) (<-chan DeviceEvent, error) {
	rules := [][]dbus.MatchOption{
		{dbus.WithMatchSender(BusName), dbus.WithMatchObjectPath(ManagerPath),
			dbus.WithMatchInterface("org.freedesktop.DBus.ObjectManager")},
		{dbus.WithMatchSender(BusName), dbus.WithMatchPathNamespace(DevicesPath),
			dbus.WithMatchInterface("org.freedesktop.DBus.Properties"), dbus.WithMatchMember("PropertiesChanged")},
	}
	for i, rule := range rules {
		if err := c.conn.AddMatchSignalContext(ctx, rule...); err != nil {
			for _, added := range rules[:i] {
				_ = c.conn.RemoveMatchSignal(added...)
			}
			return nil, err
		}
	}
	raw := make(chan *dbus.Signal, 64)
	c.conn.Signal(raw)
	out := make(chan DeviceEvent, 64)
	go func() {
		defer close(out)
		defer func() {
			c.conn.RemoveSignal(raw)
			for _, rule := range rules {
				_ = c.conn.RemoveMatchSignal(rule...)
			}
		}()
		for {
			select {
			case <-ctx.Done():
				return
			case sig, ok := <-raw:
				if !ok {
					return
				}
				if ev, ok := deviceEvent(sig); ok {
					select {
					case out <- ev:
					case <-ctx.Done():
						return
					}
				}
			}
		}
	}()
	return out, nil
}

func deviceEvent(sig *dbus.Signal) (DeviceEvent, bool) {
	switch sig.Name {
	case "org.freedesktop.DBus.ObjectManager.InterfacesAdded":
		var p dbus.ObjectPath
		var ifaces map[string]map[string]dbus.Variant
		if dbus.Store(sig.Body, &p, &ifaces) != nil || ifaces[DeviceInterface] == nil {
			return DeviceEvent{}, false
		}
		return DeviceEvent{DeviceAdded, idOf(p), p, ifaces[DeviceInterface]}, true
	case "org.freedesktop.DBus.ObjectManager.InterfacesRemoved":
		var p dbus.ObjectPath
		var ifaces []string
		if dbus.Store(sig.Body, &p, &ifaces) != nil {
			return DeviceEvent{}, false
		}
		return DeviceEvent{DeviceRemoved, idOf(p), p, nil}, true
	case "org.freedesktop.DBus.Properties.PropertiesChanged":
		var iface string
		var changed map[string]dbus.Variant
		var invalidated []string
		if dbus.Store(sig.Body, &iface, &changed, &invalidated) != nil || iface != DeviceInterface {
			return DeviceEvent{}, false
		}
		if !strings.HasPrefix(string(sig.Path), string(DevicesPath)+"/") {
			return DeviceEvent{}, false
		}
		return DeviceEvent{DeviceChanged, idOf(sig.Path), sig.Path, changed}, true
	}
	return DeviceEvent{}, false
}

func idOf(p dbus.ObjectPath) string { return path.Base(string(p)) }
