package vfiod

import (
	"context"
	"time"

	"github.com/godbus/dbus/v5"
)

// The daemon on the bus.
const (
	BusName          = "org.hypeman.Devices1"
	ManagerPath      = dbus.ObjectPath("/org/hypeman/Devices1")
	ManagerInterface = "org.hypeman.Devices1.Manager"
	DeviceInterface  = "org.hypeman.Devices1.Device"
)

// DefaultTimeout bounds a call whose context has no deadline. Binding a GPU can take a minute (NVIDIA's
// driver unbinds slowly), so it is generous; reads answer in milliseconds.
const DefaultTimeout = 2 * time.Minute

// Options say how to reach vfiod.
type Options struct {
	// Address of a private bus (vfiod run --bus ADDRESS), e.g. "unix:path=/run/x/bus"; empty: the system bus.
	Address string
	// Interactive lets polkit ask a person for a password (the ALLOW_INTERACTIVE_AUTHORIZATION flag); a
	// daemon such as hypeman leaves it off, so a call it is not allowed fails at once with ErrNotAuthorized.
	Interactive bool
	// Strict makes a record with a key this package does not know (or without one it expects) an error:
	// for tests that keep the client and the daemon in step. Off, such keys are ignored.
	Strict bool
}

// Client calls one vfiod. It is safe for concurrent use.
type Client struct {
	conn *dbus.Conn
	obj  dbus.BusObject
	opts Options
}

// New connects to vfiod's bus (a private connection: Close it when done).
func New(opts Options) (*Client, error) {
	var conn *dbus.Conn
	var err error
	if opts.Address != "" {
		conn, err = dbus.Connect(opts.Address)
	} else {
		conn, err = dbus.ConnectSystemBus()
	}
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, obj: conn.Object(BusName, ManagerPath), opts: opts}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Conn is the connection, for what this package does not wrap.
func (c *Client) Conn() *dbus.Conn { return c.conn }

// call runs one Manager method under the context's deadline (DefaultTimeout if it has none) and stores
// its out-arguments in out; a vfiod error reply becomes *Error.
func (c *Client) call(ctx context.Context, method string, out []interface{}, args ...interface{}) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultTimeout)
		defer cancel()
	}
	var flags dbus.Flags
	if c.opts.Interactive {
		flags |= dbus.FlagAllowInteractiveAuthorization
	}
	call := c.obj.CallWithContext(ctx, ManagerInterface+"."+method, flags, args...)
	if call.Err != nil {
		return mapError(call.Err)
	}
	if len(out) == 0 {
		return nil
	}
	return call.Store(out...)
}

// Version is the running daemon's version (the Manager's Version property).
func (c *Client) Version(ctx context.Context) (string, error) {
	var v dbus.Variant
	err := c.obj.CallWithContext(ctx, "org.freedesktop.DBus.Properties.Get", 0, ManagerInterface, "Version").Store(&v)
	if err != nil {
		return "", mapError(err)
	}
	s, _ := v.Value().(string)
	return s, nil
}

type options map[string]dbus.Variant

func (o options) flag(key string, on bool) options {
	if on {
		o[key] = dbus.MakeVariant(true)
	}
	return o
}

func (o options) str(key, value string) options {
	if value != "" {
		o[key] = dbus.MakeVariant(value)
	}
	return o
}

func strv(items []string) []string {
	if items == nil {
		return []string{} // 'as' must be an array, never nil
	}
	return items
}

func tagMap(tags map[string]string) map[string]string {
	if tags == nil {
		return map[string]string{}
	}
	return tags
}
