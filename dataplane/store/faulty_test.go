package store

import (
	"bytes"
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"
)

func TestMemDropUnsynced(t *testing.T) {
	m := NewMem(4 * memPage)
	synced := pattern(1, 2*memPage)
	if _, err := m.WriteAt(synced, 0); err != nil {
		t.Fatal(err)
	}
	if err := m.Sync(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.WriteAt(pattern(2, 100), 10); err != nil { // overwrite synced data
		t.Fatal(err)
	}
	if err := m.Punch(memPage, memPage); err != nil { // free a synced page
		t.Fatal(err)
	}
	if _, err := m.WriteAt(pattern(3, 10), 3*memPage); err != nil { // new page
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	m.DropUnsynced()
	m.Reopen()
	want := append(append([]byte(nil), synced...), make([]byte, 2*memPage)...)
	if got := readAll(t, m); !bytes.Equal(got, want) {
		t.Fatalf("after DropUnsynced the store differs from its last synced state at byte %d", firstDiff(got, want))
	}
	if a := m.Allocated(); a != 2*memPage {
		t.Errorf("Allocated() = %d, want %d", a, 2*memPage)
	}
	// Synced changes survive.
	if err := m.Punch(0, 2*memPage); err != nil {
		t.Fatal(err)
	}
	if err := m.Sync(); err != nil {
		t.Fatal(err)
	}
	m.DropUnsynced()
	if a := m.Allocated(); a != 0 {
		t.Errorf("after a synced punch of everything Allocated() = %d", a)
	}
}

func TestFaulty(t *testing.T) {
	const size = 64 << 10
	type call struct {
		op   Op
		off  int64
		n    int64
		want error // nil: succeeds
	}
	var errHook = errors.New("hook says no")
	cases := []struct {
		name  string
		setup func(f *Faulty)
		calls []call
	}{
		{"no faults", func(*Faulty) {}, []call{
			{OpRead, 0, 10, nil}, {OpWrite, 0, 10, nil}, {OpPunch, 0, 10, nil}, {OpZero, 0, 10, nil}, {OpSync, 0, 0, nil},
		}},
		{"all reads fail", (*Faulty).FailReads, []call{
			{OpRead, 0, 10, syscall.EIO}, {OpRead, size - 1, 1, syscall.EIO}, {OpWrite, 0, 10, nil}, {OpSync, 0, 0, nil},
		}},
		{"bad sector", func(f *Faulty) { f.FailReadsAt(4096, 512) }, []call{
			{OpRead, 0, 4096, nil}, {OpRead, 4095, 2, syscall.EIO}, {OpRead, 4600, 100, syscall.EIO},
			{OpRead, 4608, 512, nil}, {OpWrite, 4096, 512, nil},
		}},
		{"all writes fail", (*Faulty).FailWrites, []call{
			{OpWrite, 0, 1, syscall.EIO}, {OpPunch, 0, 1, syscall.EIO}, {OpZero, 0, 1, syscall.EIO}, {OpRead, 0, 1, nil},
		}},
		{"write range fails", func(f *Faulty) { f.FailWritesAt(8192, 8192) }, []call{
			{OpWrite, 0, 8192, nil}, {OpWrite, 0, 8193, syscall.EIO}, {OpPunch, 16383, 10, syscall.EIO},
			{OpZero, 16384, 10, nil}, {OpRead, 8192, 10, nil},
		}},
		{"no space", func(f *Faulty) { f.SetNoSpace(true) }, []call{
			{OpWrite, 0, 1, syscall.ENOSPC}, {OpZero, 0, 1, syscall.ENOSPC}, {OpPunch, 0, 1, nil}, {OpRead, 0, 1, nil},
		}},
		{"no space then space", func(f *Faulty) { f.SetNoSpace(true); f.SetNoSpace(false) }, []call{
			{OpWrite, 0, 1, nil},
		}},
		{"sync fails", (*Faulty).FailSync, []call{
			{OpWrite, 0, 1, nil}, {OpSync, 0, 0, syscall.EIO},
		}},
		{"hook", func(f *Faulty) {
			f.SetHook(func(op Op, off, n int64) error {
				if op == OpWrite && off >= 1000 {
					return errHook
				}
				return nil
			})
		}, []call{
			{OpWrite, 999, 1, nil}, {OpWrite, 1000, 1, errHook}, {OpRead, 1000, 1, nil},
		}},
		{"healed", func(f *Faulty) {
			f.FailReads()
			f.FailWrites()
			f.FailSync()
			f.SetNoSpace(true)
			f.SetHook(func(Op, int64, int64) error { return errHook })
			f.Heal()
		}, []call{
			{OpRead, 0, 1, nil}, {OpWrite, 0, 1, nil}, {OpPunch, 0, 1, nil}, {OpZero, 0, 1, nil}, {OpSync, 0, 0, nil},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			mem := NewMem(size)
			f := NewFaulty(mem)
			tc.setup(f)
			var calls, fails [numOps]int64
			for i, c := range tc.calls {
				if c.op == OpWrite {
					// A failed write must not reach the store.
					if err := mem.Zero(c.off, c.n); err != nil {
						t.Fatal(err)
					}
				}
				err := do(f, c.op, c.off, c.n)
				calls[c.op]++
				if c.want == nil {
					if err != nil {
						t.Fatalf("call %d (%s [%d, +%d)): %v", i, c.op, c.off, c.n, err)
					}
					continue
				}
				fails[c.op]++
				if !errors.Is(err, c.want) {
					t.Fatalf("call %d (%s [%d, +%d)): err = %v, want %v", i, c.op, c.off, c.n, err, c.want)
				}
				if c.op == OpWrite {
					b := make([]byte, c.n)
					if _, err := mem.ReadAt(b, c.off); err != nil || !bytes.Equal(b, make([]byte, c.n)) {
						t.Fatalf("call %d: a failed write changed the store (%v)", i, err)
					}
				}
			}
			for op := range numOps {
				if f.Calls(op) != calls[op] || f.Failures(op) != fails[op] {
					t.Errorf("%s: Calls=%d Failures=%d, want %d and %d", op, f.Calls(op), f.Failures(op), calls[op], fails[op])
				}
			}
		})
	}
}

func do(s Store, op Op, off, n int64) error {
	var err error
	switch op {
	case OpRead:
		_, err = s.ReadAt(make([]byte, n), off)
	case OpWrite:
		_, err = s.WriteAt(pattern(7, int(n)), off)
	case OpPunch:
		err = s.Punch(off, n)
	case OpZero:
		err = s.Zero(off, n)
	case OpSync:
		err = s.Sync()
	default:
		err = fmt.Errorf("unknown op %v", op)
	}
	return err
}

func TestFaultyFailedSyncLosesWrites(t *testing.T) {
	mem := NewMem(4096)
	f := NewFaulty(mem)
	f.FailSync()
	if _, err := f.WriteAt([]byte{42}, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("Sync = %v, want EIO", err)
	}
	mem.DropUnsynced()
	b := []byte{0}
	if _, err := f.ReadAt(b, 0); err != nil || b[0] != 0 {
		t.Fatalf("a write followed by a failed Sync survived a power loss: %#x, %v", b[0], err)
	}
}

func TestFaultySyncDelay(t *testing.T) {
	f := NewFaulty(NewMem(4096))
	const d = 50 * time.Millisecond
	f.SetSyncDelay(d)
	start := time.Now()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < d {
		t.Fatalf("Sync took %v, want at least %v", took, d)
	}

	// Close ends a pending delay.
	f.SetSyncDelay(time.Hour)
	done := make(chan error, 1)
	go func() { done <- f.Sync() }()
	time.Sleep(10 * time.Millisecond) // let it start waiting (if it has not, Close still ends the wait)
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done: // the Mem underneath is closed, so the Sync fails or succeeds; it must return
	case <-time.After(5 * time.Second):
		t.Fatal("Sync still waiting an hour after Close")
	}
}
