package guestconfig

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"testing"
)

// FuzzDecode feeds arbitrary bytes to the agent's config drive decoder. It
// must never panic, and whatever it accepts must survive a round trip:
// encoding the decoded config and decoding that gives the same config, and
// encoding is stable (the second encoding equals the first).
func FuzzDecode(f *testing.F) {
	full := sample()
	full.WaitTimeoutSec = 30
	full.Network.DNS = []string{"1.1.1.1", "9.9.9.9"}
	full.Env = map[string]string{"A": "1", "CI_DEBUG": "", "é": "ünïcode <&>"}
	full.CACertsPEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
	full.UnixTimeNano = 1_700_000_000_000_000_000
	full.EntropySeed = []byte{0, 1, 2, 255}
	for _, c := range []Config{sample(), full, {Hostname: "fr-smoke", JobTimeoutSec: 5, Command: []string{"sh", "-c", "echo hi"}}} {
		b, err := Encode(c)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		f.Add(b[:16+len(b)/8]) // truncated body
	}
	drive := func(js string) []byte {
		b := make([]byte, 16+len(js))
		copy(b, driveMagic[:])
		binary.BigEndian.PutUint64(b[8:16], uint64(len(js)))
		copy(b[16:], js)
		return b
	}
	for _, js := range []string{
		`null`, `{}`, `[]`, `{"job_timeout_sec":1,"command":[]}`, `{"job_timeout_sec":1,"command":["x"],"env":{}}`,
		`{"job_timeout_sec":1,"runner_token":"t","gitlab_url":"http://g","network":{}}`,
		`{"JOB_TIMEOUT_SEC":2,"Command":["x"],"entropy_seed":""}`,
		`{"job_timeout_sec":1,"command":["x"],"entropy_seed":"not base64"}`,
		`{"job_timeout_sec":1e3,"command":["x"]}`, `{"job_timeout_sec":1,"command":["x"],"hostname":"\ud800"}`,
		`{"job_timeout_sec":1,"command":["x"],"hostname":"a","hostname":"b"}`,
	} {
		f.Add(drive(js))
	}
	f.Add([]byte{})
	f.Add(make([]byte, 4096))
	f.Add(append(driveMagic[:], 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Decode(bytes.NewReader(b))
		if err != nil {
			if len(b) >= 16 && !bytes.HasPrefix(b, driveMagic[:]) && !errors.Is(err, ErrNotConfigDrive) {
				t.Fatalf("a whole header without the magic, but the error is %v, not ErrNotConfigDrive", err)
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("Decode accepted an invalid config: %v", err)
		}
		enc, err := Encode(c)
		if err != nil {
			t.Fatalf("a decoded config does not encode: %v", err)
		}
		if len(enc)%driveAlign != 0 {
			t.Fatalf("drive of %d bytes, not whole %d-byte blocks", len(enc), driveAlign)
		}
		again, err := Decode(bytes.NewReader(enc))
		if err != nil {
			t.Fatalf("a re-encoded config does not decode: %v", err)
		}
		if !reflect.DeepEqual(normEmpty(c), normEmpty(again)) {
			t.Fatalf("round trip changed the config:\nfirst  %#v\nsecond %#v", c, again)
		}
		enc2, err := Encode(again)
		if err != nil || !bytes.Equal(enc, enc2) {
			t.Fatalf("encoding is not stable (err %v)", err)
		}
		other := c
		other.RunnerToken = "glrt" + "-some-other-token"
		if c.RunnerToken != "" && c.String() != other.String() {
			t.Fatalf("String() depends on the runner token's value: %q vs %q", c.String(), other.String())
		}
	})
}

// normEmpty treats nil and empty alike: the drive omits empty lists, maps
// and seeds, so `"env":{}` comes back as no env, which means the same.
func normEmpty(c Config) Config {
	if len(c.Env) == 0 {
		c.Env = nil
	}
	if len(c.Command) == 0 {
		c.Command = nil
	}
	if len(c.EntropySeed) == 0 {
		c.EntropySeed = nil
	}
	if c.Network != nil {
		n := *c.Network
		if len(n.DNS) == 0 {
			n.DNS = nil
		}
		c.Network = &n
	}
	return c
}
