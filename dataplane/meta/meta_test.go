package meta

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

func full() Meta {
	return Meta{
		Volume:     "prod/db-0",
		Size:       10 << 30,
		RegionSize: 64 << 10,
		Epoch:      42,
		Role:       RolePrimary,
		DataState:  UpToDate,
		Peer:       "node-b",
		Joined:     true,
		PairUID:    "3f6c2a8e-0b6e-4a5e-9d55-2d1f0c7b8a91",
		Zero:       true,
		UpdatedAt:  time.Date(2026, 3, 4, 5, 6, 7, 890123456, time.UTC),
	}
}

func minimal() Meta {
	return Meta{Volume: "a/b", Size: 1, RegionSize: MinRegionSize, Role: RoleNone, DataState: Inconsistent}
}

// same compares Metas, times by instant.
func same(a, b Meta) bool {
	if !a.UpdatedAt.Equal(b.UpdatedAt) {
		return false
	}
	a.UpdatedAt, b.UpdatedAt = time.Time{}, time.Time{}
	return reflect.DeepEqual(a, b)
}

func roundTripCases() []struct {
	name string
	m    Meta
} {
	with := func(f func(*Meta)) Meta { m := full(); f(&m); return m }
	return []struct {
		name string
		m    Meta
	}{
		{"full", full()},
		{"minimal", minimal()},
		{"backup outdated", with(func(m *Meta) { m.Role, m.DataState = RoleBackup, Outdated })},
		{"size not a multiple of the region", with(func(m *Meta) { m.Size = 10<<30 + 4097 })},
		{"largest region", with(func(m *Meta) { m.RegionSize = MaxRegionSize })},
		{"largest epoch and size", with(func(m *Meta) { m.Epoch, m.Size = math.MaxUint64, math.MaxInt64 })},
		{"local time zone", with(func(m *Meta) {
			m.UpdatedAt = time.Date(2030, 1, 2, 3, 4, 5, 6, time.FixedZone("X", -7*3600))
		})},
		{"unicode and quotes", with(func(m *Meta) { m.Peer = "nœud-\"β\"\n"; m.PairUID = `\u0000` })},
		{"peer changed", with(func(m *Meta) { m.PeerChanged, m.Peer = true, "node-c" })},
		{"peer changed, minimal", func() Meta { m := minimal(); m.PeerChanged = true; return m }()},
		{"three members", with(func(m *Meta) { m.OtherPeers = []string{"node-c", "node-d"} })},
		{"three members, one changed", with(func(m *Meta) {
			m.OtherPeers, m.OtherPeersChanged, m.PeerChanged = []string{"node-c", "node-d"}, []string{"node-d"}, true
		})},
	}
}

func TestRoundTrip(t *testing.T) {
	for _, tc := range roundTripCases() {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Decode(Encode(tc.m))
			if err != nil {
				t.Fatalf("Decode(Encode(m)): %v", err)
			}
			if !same(got, tc.m) {
				t.Fatalf("Decode(Encode(m)) = %+v, want %+v", got, tc.m)
			}
			if got.UpdatedAt.Location() != time.UTC {
				t.Errorf("decoded UpdatedAt in %v, want UTC", got.UpdatedAt.Location())
			}

			dir := t.TempDir()
			if err := Write(dir, tc.m); err != nil {
				t.Fatalf("Write: %v", err)
			}
			got, err = Read(dir)
			if err != nil {
				t.Fatalf("Read: %v", err)
			}
			if !same(got, tc.m) {
				t.Fatalf("Read(Write(m)) = %+v, want %+v", got, tc.m)
			}
			fi, err := os.Stat(filepath.Join(dir, FileName))
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("meta file mode %v, want 0600", fi.Mode().Perm())
			}
		})
	}
}

func TestEncodeLayout(t *testing.T) {
	b := Encode(full())
	if string(b[:8]) != "TNDMMETA" {
		t.Fatalf("magic %q", b[:8])
	}
	if v := binary.BigEndian.Uint32(b[8:]); v != 2 {
		t.Fatalf("version %d", v)
	}
	n := binary.BigEndian.Uint32(b[12:])
	if int(n) != len(b)-20 {
		t.Fatalf("payload length %d in a %d-byte encoding", n, len(b))
	}
	payload := string(b[16 : 16+n])
	for _, field := range []string{`"volume":"prod/db-0"`, `"regionSize":65536`, `"epoch":42`, `"role":"Primary"`,
		`"dataState":"UpToDate"`, `"joined":true`, `"pairUID":"3f6c2a8e-0b6e-4a5e-9d55-2d1f0c7b8a91"`, `"zero":true`, `"updatedAt":"2026-03-04T05:06:07.890123456Z"`} {
		if !strings.Contains(payload, field) {
			t.Errorf("payload %s lacks %s", payload, field)
		}
	}
	if sum := crc32.Checksum(b[:16+n], crc32.MakeTable(crc32.Castagnoli)); binary.BigEndian.Uint32(b[16+n:]) != sum {
		t.Fatal("trailer is not the CRC32C of the rest")
	}
}

func TestValidate(t *testing.T) {
	with := func(f func(*Meta)) Meta { m := full(); f(&m); return m }
	cases := []struct {
		name  string
		m     Meta
		field string
	}{
		{"empty volume", with(func(m *Meta) { m.Volume = "" }), "volume"},
		{"volume without namespace", with(func(m *Meta) { m.Volume = "db-0" }), "volume"},
		{"volume with empty name", with(func(m *Meta) { m.Volume = "prod/" }), "volume"},
		{"volume with two slashes", with(func(m *Meta) { m.Volume = "a/b/c" }), "volume"},
		{"zero size", with(func(m *Meta) { m.Size = 0 }), "size"},
		{"negative size", with(func(m *Meta) { m.Size = -4096 }), "size"},
		{"region too small", with(func(m *Meta) { m.RegionSize = 2048 }), "regionSize"},
		{"region too large", with(func(m *Meta) { m.RegionSize = 128 << 20 }), "regionSize"},
		{"region not a power of two", with(func(m *Meta) { m.RegionSize = 96 << 10 }), "regionSize"},
		{"region zero", with(func(m *Meta) { m.RegionSize = 0 }), "regionSize"},
		{"unknown role", with(func(m *Meta) { m.Role = "primary" }), "role"},
		{"empty role", with(func(m *Meta) { m.Role = "" }), "role"},
		{"unknown data state", with(func(m *Meta) { m.DataState = "Fine" }), "dataState"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.m.Validate()
			if err == nil || !strings.HasPrefix(err.Error(), tc.field+" ") {
				t.Fatalf("Validate() = %v, want an error about %s", err, tc.field)
			}
			if _, err := Decode(Encode(tc.m)); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("Decode of an invalid Meta: %v, want ErrCorrupt naming %s", err, tc.field)
			}
			dir := t.TempDir()
			if err := Write(dir, full()); err != nil {
				t.Fatal(err)
			}
			if err := Write(dir, tc.m); err == nil || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("Write of an invalid Meta: %v", err)
			}
			if got, err := Read(dir); err != nil || !same(got, full()) {
				t.Fatalf("a refused Write changed the file: %+v, %v", got, err)
			}
		})
	}
	if err := full().Validate(); err != nil {
		t.Fatalf("valid Meta: %v", err)
	}
}

// frame builds an encoding with a chosen version and payload and a correct
// checksum.
func frame(version uint32, payload string) []byte {
	b := append([]byte(Magic), 0, 0, 0, 0, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(b[8:], version)
	binary.BigEndian.PutUint32(b[12:], uint32(len(payload)))
	b = append(b, payload...)
	return binary.BigEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

func payloadOf(m Meta) string {
	b := Encode(m)
	return string(b[16 : len(b)-4])
}

func TestDecodeRejects(t *testing.T) {
	good := Encode(full())
	p := payloadOf(full())
	cases := []struct {
		name string
		b    []byte
		want error
		msg  string
	}{
		{"empty", nil, ErrCorrupt, "shorter"},
		{"header only", good[:16], ErrCorrupt, "shorter"},
		{"bad magic", append([]byte("TNDMMETB"), good[8:]...), ErrCorrupt, "magic"},
		{"truncated", good[:len(good)-1], ErrCorrupt, "implies"},
		{"trailing byte", append(append([]byte(nil), good...), 0), ErrCorrupt, "implies"},
		{"payload length too large", func() []byte {
			b := append([]byte(nil), good...)
			binary.BigEndian.PutUint32(b[12:], MaxPayload+1)
			return b
		}(), ErrCorrupt, "exceeds"},
		{"checksum", func() []byte {
			b := append([]byte(nil), good...)
			b[len(b)-1] ^= 1
			return b
		}(), ErrCorrupt, "checksum"},
		{"newer version", frame(5, p), ErrVersion, "version 5"},
		{"version zero", frame(0, p), ErrVersion, "version 0"},
		{"not JSON", frame(2, "hello"), ErrCorrupt, "payload"},
		{"JSON null", frame(2, "null"), ErrCorrupt, "invalid"},
		{"JSON array", frame(2, "[]"), ErrCorrupt, "payload"},
		{"unknown field", frame(2, strings.Replace(p, "{", `{"color":"red",`, 1)), ErrCorrupt, "unknown field"},
		{"unknown field, version 3", frame(3, strings.Replace(p, "{", `{"color":"red",`, 1)), ErrCorrupt, "unknown field"},
		{"peerChanged in version 2", frame(2, strings.Replace(p, "{", `{"peerChanged":true,`, 1)), ErrCorrupt, "peerChanged"},
		{"otherPeers in version 3", frame(3, strings.Replace(p, "{", `{"otherPeers":["node-c"],`, 1)), ErrCorrupt, "otherPeers"},
		{"otherPeersChanged in version 2", frame(2, strings.Replace(p, "{", `{"otherPeersChanged":["node-c"],`, 1)), ErrCorrupt, "otherPeers"},
		{"otherPeers repeats peer", frame(4, strings.Replace(p, "{", `{"otherPeers":["node-b"],`, 1)), ErrCorrupt, "repeated"},
		{"otherPeers repeated", frame(4, strings.Replace(p, "{", `{"otherPeers":["node-c","node-c"],`, 1)), ErrCorrupt, "repeated"},
		{"otherPeers empty name", frame(4, strings.Replace(p, "{", `{"otherPeers":[""],`, 1)), ErrCorrupt, "empty"},
		{"otherPeersChanged not in otherPeers", frame(4, strings.Replace(p, "{", `{"otherPeers":["node-c"],"otherPeersChanged":["node-d"],`, 1)), ErrCorrupt, "otherPeersChanged"},
		{"otherPeersChanged names peer", frame(4, strings.Replace(p, "{", `{"otherPeers":["node-c"],"otherPeersChanged":["node-b"],`, 1)), ErrCorrupt, "otherPeersChanged"},
		{"peerChanged not a bool", frame(3, strings.Replace(p, "{", `{"peerChanged":1,`, 1)), ErrCorrupt, "peerChanged"},
		{"two objects", frame(2, p+p), ErrCorrupt, "after the JSON object"},
		{"trailing bracket", frame(2, p+"]"), ErrCorrupt, "after the JSON object"},
		{"wrong type", frame(2, strings.Replace(p, `"epoch":42`, `"epoch":"42"`, 1)), ErrCorrupt, "epoch"},
		{"negative epoch", frame(2, strings.Replace(p, `"epoch":42`, `"epoch":-1`, 1)), ErrCorrupt, "epoch"},
		{"invalid field", frame(2, strings.Replace(p, `"Primary"`, `"Leader"`, 1)), ErrCorrupt, "role"},
		{"payload over the cap", frame(2, strings.Replace(p, `"node-b"`, `"`+strings.Repeat("x", MaxPayload)+`"`, 1)), ErrCorrupt, "exceeds"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Decode(tc.b)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Decode = %+v, %v; want an error wrapping %v mentioning %q", m, err, tc.want, tc.msg)
			}
			if !reflect.DeepEqual(m, Meta{}) {
				t.Fatalf("Decode returned %+v with its error", m)
			}
			if tc.want == ErrVersion && errors.Is(err, ErrCorrupt) {
				t.Fatal("an intact file of another version is reported corrupt")
			}
		})
	}
	// With whitespace around it the payload is still a valid object.
	if _, err := Decode(frame(2, " \n"+p+"\n ")); err != nil {
		t.Fatalf("payload with surrounding whitespace: %v", err)
	}
}

// TestEveryFlipDetected flips every bit, every whole byte, and truncates at
// every length; each must fail as corrupt, never decode to another Meta.
func TestEveryFlipDetected(t *testing.T) {
	for _, tc := range roundTripCases() {
		good := Encode(tc.m)
		check := func(what string, b []byte) {
			t.Helper()
			if m, err := Decode(b); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("%s: %s: Decode = %+v, %v; want ErrCorrupt", tc.name, what, m, err)
			}
		}
		b := append([]byte(nil), good...)
		for i := range b {
			for bit := range 8 {
				b[i] ^= 1 << bit
				check(fmt.Sprintf("bit %d of byte %d flipped", bit, i), b)
				b[i] ^= 1 << bit
			}
			b[i] ^= 0xFF
			check(fmt.Sprintf("byte %d inverted", i), b)
			b[i] ^= 0xFF
		}
		for n := range len(good) {
			check(fmt.Sprintf("truncated to %d bytes", n), good[:n])
		}
	}
}

func TestReadErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := Read(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Read of an empty dir: %v, want fs.ErrNotExist", err)
	}
	if err := Write(filepath.Join(dir, "missing"), full()); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Write into a missing dir: %v, want fs.ErrNotExist", err)
	}
	// A torn file (as a non-atomic writer would leave) is corrupt.
	good := Encode(full())
	if err := os.WriteFile(filepath.Join(dir, FileName), good[:len(good)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(dir); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), dir) {
		t.Fatalf("Read of a torn file: %v, want ErrCorrupt naming the path", err)
	}
	// A huge file is refused without decoding.
	if err := os.WriteFile(filepath.Join(dir, FileName), make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(dir); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("Read of a 1 MiB file: %v", err)
	}
}

func temps(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, FileName+".tmp-*"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestCrashAtomicity simulates crashes at each step of a Write: the old
// metadata stays readable, and the next Write cleans up.
func TestCrashAtomicity(t *testing.T) {
	dir := t.TempDir()
	a := full()
	if err := Write(dir, a); err != nil {
		t.Fatal(err)
	}
	b := full()
	b.Epoch, b.Role, b.DataState = 43, RoleBackup, Outdated
	encB := Encode(b)
	// Crash while writing the temporary file, and crash after writing it
	// but before the rename.
	for i, content := range [][]byte{encB[:len(encB)/3], encB, nil} {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("%s.tmp-%d", FileName, i)), content, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	got, err := Read(dir)
	if err != nil || !same(got, a) {
		t.Fatalf("Read with leftover temporary files = %+v, %v; want the old metadata", got, err)
	}
	if n := len(temps(t, dir)); n != 3 {
		t.Fatalf("Read changed the directory: %d temporary files", n)
	}
	c := full()
	c.Epoch = 44
	if err := Write(dir, c); err != nil {
		t.Fatal(err)
	}
	if got, err := Read(dir); err != nil || !same(got, c) {
		t.Fatalf("Read after Write = %+v, %v", got, err)
	}
	if left := temps(t, dir); len(left) != 0 {
		t.Fatalf("Write left temporary files: %v", left)
	}
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 1 {
		t.Fatalf("dir holds %v (%v), want only %s", entries, err, FileName)
	}
}

func TestConcurrentWrites(t *testing.T) {
	dir := t.TempDir()
	const writers = 8
	var wg sync.WaitGroup
	errs := make(chan error, writers*5)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 5 {
				m := full()
				m.Epoch = uint64(w*100 + i)
				// Use differently spelled paths to the same directory.
				d := dir
				if w%2 == 1 {
					d = dir + "/."
				}
				if err := Write(d, m); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	got, err := Read(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Epoch%100 != 4 {
		t.Errorf("final epoch %d is not some writer's last", got.Epoch)
	}
	if left := temps(t, dir); len(left) != 0 {
		t.Fatalf("concurrent Writes left temporary files: %v", left)
	}
}

func FuzzDecode(f *testing.F) {
	for _, tc := range roundTripCases() {
		f.Add(Encode(tc.m))
	}
	good := Encode(full())
	f.Add([]byte{})
	f.Add([]byte(Magic))
	f.Add(good[:len(good)-1])
	f.Add(frame(2, "{}"))
	f.Add(frame(2, payloadOf(full())+" "))
	f.Add(frame(2, payloadOf(full())))
	f.Add(frame(3, payloadOf(full())))
	f.Add(frame(2, strings.Replace(payloadOf(full()), "{", `{"peerChanged":true,`, 1)))
	f.Add(frame(2, `{"volume":"a/b","size":1,"regionSize":4096,"role":"None","dataState":"Outdated","updatedAt":"0001-01-01T00:00:00Z","VOLUME":"c/d"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrVersion) {
				t.Fatalf("error wraps neither ErrCorrupt nor ErrVersion: %v", err)
			}
			if !reflect.DeepEqual(m, Meta{}) {
				t.Fatalf("non-zero Meta returned with error %v", err)
			}
			return
		}
		if err := m.Validate(); err != nil {
			t.Fatalf("Decode accepted an invalid Meta: %v", err)
		}
		// Whatever decodes re-encodes to the same Meta.
		again, err := Decode(Encode(m))
		if err != nil || !same(again, m) {
			t.Fatalf("re-encoding %+v gives %+v, %v", m, again, err)
		}
		if !bytes.Equal(b[:8], []byte(Magic)) {
			t.Fatal("accepted without the magic")
		}
	})
}

// TestDecodeVersion1: a file written by an agent before the replica
// identity fields is still read, as a replica joined to its pair whose UID
// is not known yet; its createdFresh says nothing about the contents now.
func TestDecodeVersion1(t *testing.T) {
	p := `{"volume":"prod/db-0","uid":"x","size":1048576,"regionSize":65536,"epoch":3,"role":"Backup",` +
		`"dataState":"UpToDate","peer":"node-a","createdFresh":true,"updatedAt":"2026-03-04T05:06:07Z"}`
	m, err := Decode(frame(1, p))
	if err != nil {
		t.Fatal(err)
	}
	want := Meta{Volume: "prod/db-0", Size: 1 << 20, RegionSize: 64 << 10, Epoch: 3, Role: RoleBackup, DataState: UpToDate,
		Peer: "node-a", Joined: true, UpdatedAt: time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)}
	if !same(m, want) {
		t.Fatalf("Decode(version 1) = %+v, want %+v", m, want)
	}
	// Version 1 knows none of version 2's fields.
	if _, err := Decode(frame(1, strings.Replace(p, `"epoch":3`, `"epoch":3,"joined":true`, 1))); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("a version 1 file with a version 2 field: %v", err)
	}
	// Written back, it is version 2.
	if v := binary.BigEndian.Uint32(Encode(m)[8:]); v != 2 {
		t.Fatalf("re-encoded as version %d", v)
	}
}

// TestPeerChanged: the flag round-trips, is written as version 3 only when
// set (so an agent that reads versions 1 and 2 refuses exactly the files
// that carry it), and files without it, of versions 1, 2 and 3, read as
// false.
func TestPeerChanged(t *testing.T) {
	m := full()
	m.Peer, m.PeerChanged = "node-c", true
	b := Encode(m)
	if v := binary.BigEndian.Uint32(b[8:]); v != 3 {
		t.Fatalf("a Meta with PeerChanged encoded as version %d, want 3", v)
	}
	if p := payloadOf(m); !strings.Contains(p, `"peerChanged":true`) {
		t.Fatalf("payload %s lacks peerChanged", p)
	}
	got, err := Decode(b)
	if err != nil || !got.PeerChanged || !same(got, m) {
		t.Fatalf("Decode = %+v, %v; want %+v", got, err, m)
	}
	dir := t.TempDir()
	if err := Write(dir, m); err != nil {
		t.Fatal(err)
	}
	if got, err := Read(dir); err != nil || !got.PeerChanged || !same(got, m) {
		t.Fatalf("Read = %+v, %v; want %+v", got, err, m)
	}

	// Cleared, the file is version 2 again and has no peerChanged key.
	m.PeerChanged = false
	if err := Write(dir, m); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	if v := binary.BigEndian.Uint32(raw[8:]); v != 2 || bytes.Contains(raw, []byte("peerChanged")) {
		t.Fatalf("a Meta without PeerChanged written as version %d: %q", v, raw)
	}
	if got, err := Read(dir); err != nil || got.PeerChanged || !same(got, m) {
		t.Fatalf("Read after clearing = %+v, %v", got, err)
	}

	// A file written before the field existed (version 2, as the previous
	// agent wrote it) reads as false.
	old := `{"volume":"prod/db-0","size":1048576,"regionSize":65536,"epoch":7,"role":"Primary","dataState":"UpToDate",` +
		`"peer":"node-b","joined":true,"pairUID":"u","updatedAt":"2026-03-04T05:06:07Z"}`
	for _, v := range []uint32{2, 3} {
		got, err := Decode(frame(v, old))
		if err != nil {
			t.Fatalf("version %d without peerChanged: %v", v, err)
		}
		if got.PeerChanged || got.Peer != "node-b" || !got.Joined || got.Epoch != 7 {
			t.Fatalf("version %d without peerChanged decoded as %+v", v, got)
		}
	}
	// An explicit false means the same in either version.
	for _, v := range []uint32{2, 3} {
		if got, err := Decode(frame(v, strings.Replace(old, "{", `{"peerChanged":false,`, 1))); err != nil || got.PeerChanged {
			t.Fatalf("version %d with peerChanged false: %+v, %v", v, got, err)
		}
	}
}

// TestOtherPeers: the further members round-trip, make Encode write version
// 4 (so an agent that reads up to version 3 refuses the file instead of
// reading it as tracking one member), and clearing them writes the older
// version again.
func TestOtherPeers(t *testing.T) {
	m := full()
	m.OtherPeers, m.OtherPeersChanged = []string{"node-c"}, []string{"node-c"}
	dir := t.TempDir()
	if err := Write(dir, m); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	if v := binary.BigEndian.Uint32(raw[8:]); v != 4 {
		t.Fatalf("a Meta with otherPeers written as version %d, want 4", v)
	}
	if got, err := Read(dir); err != nil || !same(got, m) {
		t.Fatalf("Read = %+v, %v; want %+v", got, err, m)
	}
	m.OtherPeers, m.OtherPeersChanged = nil, nil
	if v := binary.BigEndian.Uint32(Encode(m)[8:]); v != 2 {
		t.Fatalf("without otherPeers encoded as version %d, want 2", v)
	}
	// otherPeers needs a peer to extend.
	m.Peer, m.OtherPeers = "", []string{"node-c"}
	if err := Write(dir, m); err == nil || !strings.Contains(err.Error(), "without a peer") {
		t.Fatalf("Write of otherPeers without a peer: %v", err)
	}
}
