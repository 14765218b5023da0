package bitmap

import "testing"

func TestMarkRangeAndSticky(t *testing.T) {
	tr := NewTracker(1<<20, 64<<10) // 16 regions
	tr.MarkRange(60<<10, 8<<10)     // regions 0 and 1
	if got := tr.StickyCount(); got != 2 {
		t.Fatalf("StickyCount = %d, want 2", got)
	}
	tr.Mark(0, 4096, 1)
	tr.Acked(1)
	if !tr.IsDirty(0) {
		t.Fatal("an ack must not clean a sticky region")
	}
	s := tr.Sticky()
	if !s.Contains(0) || !s.Contains(1) || s.GetCardinality() != 2 {
		t.Fatalf("Sticky = %v", s.ToArray())
	}
	s.Add(5) // a copy: the tracker must not change
	if tr.IsDirty(5) {
		t.Fatal("Sticky must return a copy")
	}
	tok := tr.CopyBegin(0)
	if !tr.CopyDone(0, tok, 1) || tr.IsDirty(0) || tr.StickyCount() != 1 {
		t.Fatalf("copy of region 0 did not clean it: dirty=%v sticky=%d", tr.IsDirty(0), tr.StickyCount())
	}
	tr.MarkRange(1<<20, 10) // outside: no-op
	tr.MarkRange(0, 0)      // empty: no-op
	if tr.Count() != 1 {
		t.Fatalf("Count = %d, want 1", tr.Count())
	}
}
