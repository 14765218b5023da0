package authority

import (
	"crypto/sha256"
	"encoding/hex"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"
)

// Observer times Leases on the controller's own clock: for each Lease, when
// this process last saw it change. It never reads renewTime as a time; a
// different renewTime (or resourceVersion, holder or epoch) is only a sign
// that someone renewed. This is client-go leader election's observedTime.
// Safe for concurrent use.
type Observer struct {
	clock clock.PassiveClock

	mu   sync.Mutex
	seen map[string]*seen
}

type seen struct {
	rv, renew, holder, epoch string
	changed                  time.Time // the renewal last changed
	holderSince              time.Time // the holder or epoch last changed
}

// Observation is what an Observer knows of one Lease.
type Observation struct {
	// Duration is the Lease's duration.
	Duration time.Duration
	// LastChange is when this process last saw the Lease change, or first
	// saw it.
	LastChange time.Time
	// HolderSince is when this process first saw the current holder at the
	// current epoch (its own move, or its first sight of the Lease).
	HolderSince time.Time
	// ExpiresAt is LastChange + Duration + ExpiryMargin: from then on the
	// writer has fenced itself, if the two clocks' rates agree as the
	// package doc assumes.
	ExpiresAt time.Time
	// Expired: the observation was made after ExpiresAt.
	Expired bool
}

// NewObserver returns an Observer on c (clock.RealClock{} in production).
func NewObserver(c clock.PassiveClock) *Observer {
	return &Observer{clock: c, seen: map[string]*seen{}}
}

// Observe records l as seen now and returns what is known of it.
func (o *Observer) Observe(l *coordinationv1.Lease) Observation {
	now := o.clock.Now()
	cur := seen{rv: l.ResourceVersion, holder: ptr.Deref(l.Spec.HolderIdentity, ""), epoch: l.Annotations[AnnEpoch]}
	if l.Spec.RenewTime != nil {
		cur.renew = l.Spec.RenewTime.UTC().Format(time.RFC3339Nano)
	}
	key := l.Namespace + "/" + l.Name
	o.mu.Lock()
	prev := o.seen[key]
	switch {
	case prev == nil:
		cur.changed, cur.holderSince = now, now
	case prev.holder != cur.holder || prev.epoch != cur.epoch:
		cur.changed, cur.holderSince = now, now
	case prev.rv != cur.rv || prev.renew != cur.renew:
		cur.changed, cur.holderSince = now, prev.holderSince
	default:
		cur.changed, cur.holderSince = prev.changed, prev.holderSince
	}
	o.seen[key] = &cur
	o.mu.Unlock()
	d := Duration(l)
	exp := cur.changed.Add(d + ExpiryMargin)
	return Observation{Duration: d, LastChange: cur.changed, HolderSince: cur.holderSince, ExpiresAt: exp, Expired: now.After(exp)}
}

// Forget drops what is known of the Lease namespace/name (deleted).
func (o *Observer) Forget(namespace, name string) {
	o.mu.Lock()
	delete(o.seen, namespace+"/"+name)
	o.mu.Unlock()
}

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}
