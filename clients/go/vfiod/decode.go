package vfiod

import (
	"fmt"
	"reflect"
	"sort"
	"strings"

	"github.com/godbus/dbus/v5"
)

// decodeRecord fills the struct *out from an a{sv} record by its fields' `vfiod` tags. A key of the wrong
// D-Bus type is an error. In strict mode a key the struct does not know, or a tagged key the record lacks
// (unless ",optional"), is an error too; otherwise both are ignored, so a newer vfiod's keys do no harm.
func decodeRecord(rec map[string]dbus.Variant, out interface{}, strict bool) error {
	v := reflect.ValueOf(out).Elem()
	t := v.Type()
	known := map[string]bool{}
	var missing []string
	for i := 0; i < t.NumField(); i++ {
		tag := t.Field(i).Tag.Get("vfiod")
		if tag == "" {
			continue
		}
		key, optional := strings.TrimSuffix(tag, ",optional"), strings.HasSuffix(tag, ",optional")
		known[key] = true
		val, ok := rec[key]
		if !ok {
			if !optional {
				missing = append(missing, key)
			}
			continue
		}
		if err := assign(v.Field(i), val.Value(), strict); err != nil {
			return fmt.Errorf("vfiod: %s record key %q: %w", t.Name(), key, err)
		}
	}
	if !strict {
		return nil
	}
	var unknown []string
	for key := range rec {
		if !known[key] {
			unknown = append(unknown, key)
		}
	}
	sort.Strings(unknown)
	if len(unknown) > 0 || len(missing) > 0 {
		return fmt.Errorf("vfiod: %s record: unknown keys %v, missing keys %v", t.Name(), unknown, missing)
	}
	return nil
}

func assign(field reflect.Value, value interface{}, strict bool) error {
	switch field.Kind() {
	case reflect.Struct: // a nested record, a{sv}
		rec, ok := value.(map[string]dbus.Variant)
		if !ok {
			return fmt.Errorf("want a{sv}, got %T", value)
		}
		return decodeRecord(rec, field.Addr().Interface(), strict)
	case reflect.Slice:
		if field.Type().Elem().Kind() == reflect.Struct { // a list of records, aa{sv}
			recs, ok := value.([]map[string]dbus.Variant)
			if !ok {
				return fmt.Errorf("want aa{sv}, got %T", value)
			}
			out := reflect.MakeSlice(field.Type(), len(recs), len(recs))
			for i, rec := range recs {
				if err := decodeRecord(rec, out.Index(i).Addr().Interface(), strict); err != nil {
					return err
				}
			}
			field.Set(out)
			return nil
		}
	case reflect.Ptr: // an optional scalar
		inner := reflect.New(field.Type().Elem())
		if err := assign(inner.Elem(), value, strict); err != nil {
			return err
		}
		field.Set(inner)
		return nil
	}
	got := reflect.ValueOf(value)
	if !got.IsValid() || got.Type() != field.Type() {
		return fmt.Errorf("want %s, got %T", field.Type(), value)
	}
	field.Set(got)
	return nil
}

// decodeRecords decodes an aa{sv} reply into a slice of T.
func decodeRecords[T any](recs []map[string]dbus.Variant, strict bool) ([]T, error) {
	out := make([]T, len(recs))
	for i, rec := range recs {
		if err := decodeRecord(rec, &out[i], strict); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// decodeReport splits a report into its counters (u) and its findings (as); other keys are an error in
// strict mode.
func decodeReport(rec map[string]dbus.Variant, strict bool) (Report, error) {
	r := Report{Counters: map[string]uint32{}}
	for key, val := range rec {
		switch v := val.Value().(type) {
		case uint32:
			r.Counters[key] = v
		case []string:
			if key == "findings" {
				r.Findings = v
			} else if strict {
				return r, fmt.Errorf("vfiod: report key %q: a list other than findings", key)
			}
		default:
			if strict {
				return r, fmt.Errorf("vfiod: report key %q: want u or as, got %T", key, v)
			}
		}
	}
	return r, nil
}
