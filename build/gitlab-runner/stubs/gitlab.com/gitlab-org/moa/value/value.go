// Package value is a compile-only stand-in for moa's values: enough to decode
// and type-check job inputs sent by GitLab, not to evaluate expressions.
package value

import (
	"encoding/json"
	"errors"
	"fmt"
	"iter"
)

// Kind is the kind of a value.
type Kind int

const (
	NullKind Kind = iota
	StringKind
	NumberKind
	BoolKind
	ArrayKind
	ObjectKind
)

func (k Kind) String() string {
	switch k {
	case StringKind:
		return "string"
	case NumberKind:
		return "number"
	case BoolKind:
		return "boolean"
	case ArrayKind:
		return "array"
	case ObjectKind:
		return "object"
	}
	return "null"
}

var (
	ErrAttributeNotFound = errors.New("attribute not found")
	ErrInvalidKey        = errors.New("invalid key")
)

// Mapper is an object's behaviour.
type Mapper interface {
	Attr(a string) (Value, error)
	Get(key Value) (Value, error)
	Keys() iter.Seq[Value]
	Values() iter.Seq[Value]
	All() iter.Seq2[Value, Value]
	Len() int
	WithMarks(marks uint16) Mapper
}

// Value is a dynamically typed value.
type Value struct {
	v     any
	marks uint16
}

func Null() Value              { return Value{} }
func String(s string) Value    { return Value{v: s} }
func Object(m Mapper) Value    { return Value{v: m} }
func (v Value) Marks() uint16  { return v.marks }
func (v Value) Interface() any { return v.v }

func (v Value) Kind() Kind {
	switch v.v.(type) {
	case nil:
		return NullKind
	case string:
		return StringKind
	case float64, json.Number:
		return NumberKind
	case bool:
		return BoolKind
	case []any:
		return ArrayKind
	default:
		return ObjectKind
	}
}

func (v Value) String() string {
	switch x := v.v.(type) {
	case nil:
		return ""
	case string:
		return x
	default:
		b, err := json.Marshal(x)
		if err != nil {
			return fmt.Sprint(x)
		}
		return string(b)
	}
}

func (v Value) WithMarks(marks uint16) Value {
	v.marks |= marks
	return v
}

func (v Value) HasMarks(marks uint16) bool { return v.marks&marks != 0 }

func (v *Value) UnmarshalJSON(b []byte) error {
	return json.Unmarshal(b, &v.v)
}

func (v Value) MarshalJSON() ([]byte, error) {
	if _, ok := v.v.(Mapper); ok {
		return nil, errors.New("objects backed by a Mapper cannot be marshalled in this build")
	}
	return json.Marshal(v.v)
}
