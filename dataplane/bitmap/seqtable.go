package bitmap

// seqTable maps region -> highest in-flight seq for the Tracker's write path.
// It is an open-addressing hash table with linear probing and backward-shift
// deletion (no tombstones), sized for the replication window: every Mark and
// Acked does one short probe in a table that stays in L1/L2, with no
// allocation in steady state. It is about three times cheaper than a Go map
// for this insert/delete churn. Not safe for concurrent use.
type seqTable struct {
	slots []seqSlot
	n     int
	shift uint8 // 32 - log2(len(slots))
}

type seqSlot struct {
	key uint32 // region + 1; 0 marks an empty slot (regions < MaxUint32)
	val uint64
}

const seqTableMinSlots = 64

func newSeqTable() seqTable {
	var t seqTable
	t.alloc(seqTableMinSlots)
	return t
}

func (t *seqTable) alloc(slots int) {
	t.slots = make([]seqSlot, slots)
	t.n = 0
	t.shift = uint8(32 - log2(uint64(slots)))
}

func log2(v uint64) uint {
	var n uint
	for v > 1 {
		v >>= 1
		n++
	}
	return n
}

// home is the preferred slot of key k (Fibonacci hashing).
func (t *seqTable) home(k uint32) uint32 {
	return (k * 0x9E3779B9) >> t.shift
}

func (t *seqTable) mask() uint32 { return uint32(len(t.slots) - 1) }

// find returns the slot index holding region r and true, or the empty slot
// where it would go and false.
func (t *seqTable) find(r uint32) (uint32, bool) {
	k := r + 1
	m := t.mask()
	for i := t.home(k); ; i = (i + 1) & m {
		switch t.slots[i].key {
		case k:
			return i, true
		case 0:
			return i, false
		}
	}
}

func (t *seqTable) get(r uint32) (uint64, bool) {
	i, ok := t.find(r)
	return t.slots[i].val, ok
}

func (t *seqTable) has(r uint32) bool {
	_, ok := t.find(r)
	return ok
}

// set stores seq for region r.
func (t *seqTable) set(r uint32, seq uint64) {
	i, ok := t.find(r)
	if ok {
		t.slots[i].val = seq
		return
	}
	if 4*(t.n+1) > len(t.slots) { // load <= 1/4 keeps probe runs short
		t.rehash(2 * len(t.slots))
		i, _ = t.find(r)
	}
	t.slots[i] = seqSlot{key: r + 1, val: seq}
	t.n++
}

// deleteIfAtMost removes region r if its seq is <= upTo.
func (t *seqTable) deleteIfAtMost(r uint32, upTo uint64) {
	if i, ok := t.find(r); ok && t.slots[i].val <= upTo {
		t.deleteAt(i)
	}
}

func (t *seqTable) delete(r uint32) {
	if i, ok := t.find(r); ok {
		t.deleteAt(i)
	}
}

// deleteAt empties slot i and shifts later members of its probe run back so
// that every key stays reachable from its home slot.
func (t *seqTable) deleteAt(i uint32) {
	m := t.mask()
	for j := (i + 1) & m; t.slots[j].key != 0; j = (j + 1) & m {
		h := t.home(t.slots[j].key)
		// Move j into the hole at i unless its home lies cyclically in (i, j].
		if (j-h)&m >= (j-i)&m {
			t.slots[i] = t.slots[j]
			i = j
		}
	}
	t.slots[i] = seqSlot{}
	t.n--
}

func (t *seqTable) rehash(slots int) {
	old := t.slots
	t.alloc(slots)
	for _, s := range old {
		if s.key != 0 {
			i, _ := t.find(s.key - 1)
			t.slots[i] = s
			t.n++
		}
	}
}

// maybeShrink returns memory after a burst (a large write or a long window):
// when at most 1/32 full it halves until at most 1/8 full.
func (t *seqTable) maybeShrink() {
	if len(t.slots) <= seqTableMinSlots || 32*t.n > len(t.slots) {
		return
	}
	slots := len(t.slots)
	for slots > seqTableMinSlots && 8*t.n < slots/2 {
		slots /= 2
	}
	t.rehash(slots)
}

func (t *seqTable) len() int { return t.n }

// forEach calls fn for every region in the table.
func (t *seqTable) forEach(fn func(r uint32, seq uint64)) {
	for _, s := range t.slots {
		if s.key != 0 {
			fn(s.key-1, s.val)
		}
	}
}

// reset empties the table, shrinking it to its minimum size.
func (t *seqTable) reset() {
	if len(t.slots) > seqTableMinSlots {
		t.alloc(seqTableMinSlots)
		return
	}
	clear(t.slots)
	t.n = 0
}
