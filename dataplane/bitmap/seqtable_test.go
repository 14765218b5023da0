package bitmap

import (
	"math/rand/v2"
	"testing"
)

// TestSeqTableMatchesMap drives seqTable and a Go map with the same random
// operations, with keys drawn from a small range so probe runs collide, wrap
// around the table end and get shifted by deletions.
func TestSeqTableMatchesMap(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, keyRange := range []uint32{8, 100, 5000, MaxRegions} {
		st := newSeqTable()
		ref := map[uint32]uint64{}
		for step := 0; step < 200000; step++ {
			r := rng.Uint32N(keyRange)
			if keyRange == MaxRegions && rng.IntN(4) == 0 {
				r = MaxRegions - 1 - rng.Uint32N(4) // largest regions
			}
			switch op := rng.IntN(10); {
			case op < 5:
				v := rng.Uint64N(1000)
				st.set(r, v)
				ref[r] = v
			case op < 7:
				st.delete(r)
				delete(ref, r)
			case op < 9:
				upTo := rng.Uint64N(1000)
				st.deleteIfAtMost(r, upTo)
				if v, ok := ref[r]; ok && v <= upTo {
					delete(ref, r)
				}
			default:
				if rng.IntN(500) == 0 {
					st.reset()
					clear(ref)
				} else {
					st.maybeShrink()
				}
			}
			v, ok := st.get(r)
			rv, rok := ref[r]
			if ok != rok || v != rv || st.len() != len(ref) {
				t.Fatalf("range %d step %d: get(%d) = %d,%v len %d; map %d,%v len %d", keyRange, step, r, v, ok, st.len(), rv, rok, len(ref))
			}
			if step%997 == 0 {
				seen := 0
				st.forEach(func(k uint32, v uint64) {
					if ref[k] != v {
						t.Fatalf("forEach: %d=%d, map %d", k, v, ref[k])
					}
					seen++
				})
				if seen != len(ref) {
					t.Fatalf("forEach saw %d of %d", seen, len(ref))
				}
			}
		}
	}
}

func TestSeqTableGrowAndShrink(t *testing.T) {
	st := newSeqTable()
	for r := uint32(0); r < 10000; r++ {
		st.set(r, uint64(r))
	}
	if len(st.slots) < 40000 {
		t.Fatalf("%d slots for 10000 entries", len(st.slots))
	}
	for r := uint32(0); r < 9990; r++ {
		st.deleteIfAtMost(r, uint64(r))
	}
	st.maybeShrink()
	if st.len() != 10 || len(st.slots) > 256 {
		t.Fatalf("after shrink: %d entries in %d slots", st.len(), len(st.slots))
	}
	for r := uint32(9990); r < 10000; r++ {
		if v, ok := st.get(r); !ok || v != uint64(r) {
			t.Fatalf("lost %d after shrink", r)
		}
	}
}
