package vfiod

import (
	"errors"
	"strings"

	"github.com/godbus/dbus/v5"
)

// ErrorPrefix starts the D-Bus name of every error vfiod answers.
const ErrorPrefix = "org.hypeman.Devices1.Error."

// Error is an error vfiod answered: Name is the contract's short name ("InUse", "IOMMUGroupConflict", ...)
// and Message the sentence vfiod wrote for a person.
type Error struct {
	Name    string
	Message string
}

func (e *Error) Error() string { return "vfiod: " + e.Name + ": " + e.Message }

// Is makes errors.Is(err, ErrInUse) true for any *Error with that name, whatever its message.
func (e *Error) Is(target error) bool {
	var t *Error
	return errors.As(target, &t) && t.Name == e.Name
}

// The contract's errors, one sentinel each, for errors.Is. Busy may answer any call: nothing was done, call
// again once earlier calls are answered. Recovering: vfiod is finishing an operation on the device that a
// restart interrupted; call again in a few seconds.
var (
	ErrNotFound                = &Error{Name: "NotFound"}
	ErrDeviceNotFound          = &Error{Name: "DeviceNotFound"}
	ErrInvalidPCIAddress       = &Error{Name: "InvalidPCIAddress"}
	ErrInvalidName             = &Error{Name: "InvalidName"}
	ErrInvalidArgument         = &Error{Name: "InvalidArgument"}
	ErrNameExists              = &Error{Name: "NameExists"}
	ErrAlreadyExists           = &Error{Name: "AlreadyExists"}
	ErrInUse                   = &Error{Name: "InUse"}
	ErrNotOwner                = &Error{Name: "NotOwner"}
	ErrAlreadyBound            = &Error{Name: "AlreadyBound"}
	ErrNotBound                = &Error{Name: "NotBound"}
	ErrIOMMUGroupConflict      = &Error{Name: "IOMMUGroupConflict"}
	ErrHostCritical            = &Error{Name: "HostCritical"}
	ErrSriovEnabled            = &Error{Name: "SriovEnabled"}
	ErrProfileNotFound         = &Error{Name: "ProfileNotFound"}
	ErrNoCapacity              = &Error{Name: "NoCapacity"}
	ErrDeviceBusy              = &Error{Name: "DeviceBusy"}
	ErrVFIONotAvailable        = &Error{Name: "VFIONotAvailable"}
	ErrNativeDriverNotRestored = &Error{Name: "NativeDriverNotRestored"}
	ErrNativeIsVfio            = &Error{Name: "NativeIsVfio"}
	ErrHandoffUnsupported      = &Error{Name: "HandoffUnsupported"}
	ErrTimeout                 = &Error{Name: "Timeout"}
	ErrNotAuthorized           = &Error{Name: "NotAuthorized"}
	ErrBusy                    = &Error{Name: "Busy"}
	ErrRecovering              = &Error{Name: "Recovering"}
	ErrFailed                  = &Error{Name: "Failed"}
)

// Errors lists every sentinel, in the contract's order.
var Errors = []*Error{
	ErrNotFound, ErrDeviceNotFound, ErrInvalidPCIAddress, ErrInvalidName, ErrInvalidArgument, ErrNameExists,
	ErrAlreadyExists, ErrInUse, ErrNotOwner, ErrAlreadyBound, ErrNotBound, ErrIOMMUGroupConflict,
	ErrHostCritical, ErrSriovEnabled, ErrProfileNotFound, ErrNoCapacity, ErrDeviceBusy, ErrVFIONotAvailable,
	ErrNativeDriverNotRestored, ErrNativeIsVfio, ErrHandoffUnsupported, ErrTimeout, ErrNotAuthorized, ErrBusy,
	ErrRecovering, ErrFailed,
}

// LeavesDeviceStuck reports whether err says a device was left stuck (only an admin's Recover returns it).
func LeavesDeviceStuck(err error) bool {
	return errors.Is(err, ErrTimeout) || errors.Is(err, ErrNativeDriverNotRestored)
}

// mapError turns a D-Bus error reply of vfiod into *Error; anything else is returned as it is.
func mapError(err error) error {
	var de dbus.Error // godbus stores error replies as dbus.Error values
	if errors.As(err, &de) && strings.HasPrefix(de.Name, ErrorPrefix) {
		msg := ""
		if len(de.Body) > 0 {
			msg, _ = de.Body[0].(string)
		}
		return &Error{Name: strings.TrimPrefix(de.Name, ErrorPrefix), Message: msg}
	}
	return err
}

// HTTPStatus maps an error of a Client call to the HTTP status a VM manager's API would answer with
// (hypeman answers 500 for every device failure today): 404 for what does not exist, 400 for bad input,
// 409 for a conflict with the device's state, 503 to retry later (Busy, Recovering) or for a host not set
// up for passthrough (VFIONotAvailable; the message says how to fix it), 500 for the rest (NotAuthorized
// and NotOwner are a deployment problem; Timeout and NativeDriverNotRestored leave a device stuck).
func HTTPStatus(err error) int {
	switch {
	case err == nil:
		return 200
	case isAny(err, ErrNotFound, ErrDeviceNotFound, ErrProfileNotFound):
		return 404
	case isAny(err, ErrInvalidArgument, ErrInvalidName, ErrInvalidPCIAddress):
		return 400
	case isAny(err, ErrInUse, ErrNameExists, ErrAlreadyExists, ErrIOMMUGroupConflict, ErrHostCritical,
		ErrSriovEnabled, ErrNoCapacity, ErrDeviceBusy, ErrAlreadyBound, ErrNotBound, ErrNativeIsVfio,
		ErrHandoffUnsupported):
		return 409
	case isAny(err, ErrVFIONotAvailable, ErrBusy, ErrRecovering):
		return 503
	}
	return 500
}

func isAny(err error, targets ...*Error) bool {
	for _, t := range targets {
		if errors.Is(err, t) {
			return true
		}
	}
	return false
}
