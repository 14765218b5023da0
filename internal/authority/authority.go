// Package authority owns Tandem's authority protocol: which member of a
// VolumePair may write, at which epoch, and for how long. The controller
// (controllers/) and the agents (dataplane/agent) both speak it through this
// package only; nothing else knows the Lease's name or annotations.
//
// # The Lease
//
// Each VolumePair has one coordination.k8s.io Lease in the operator
// namespace, named "tandem-pair-<uid>" after the VolumePair's UID (LeaseName).
// The UID is assigned by the API server, never by the user, so no VolumePair
// can be given a name that maps to another pair's Lease: "team-a/db" and
// "team/a-db" (one string once joined with "-", which is how Leases were
// named before) get two Leases. Its fields:
//
//	spec.holderIdentity          the node that may write (the writer)
//	spec.leaseDurationSeconds    how long a renewal lasts (spec.failover.leaseDurationSeconds)
//	spec.renewTime               informational: the renewing node's wall clock; nobody computes with it
//	spec.acquireTime             when the controller last moved the authority (informational)
//	storage.tandem.dev/epoch            the writer's epoch; every move adds one
//	storage.tandem.dev/failed-over      "true" while the writer is the backup because of a failover
//	storage.tandem.dev/volumepair       "<namespace>/<name>" of the owning pair (for people)
//	storage.tandem.dev/volumepair-uid   the owning pair's UID: what ownership is checked on
//
// # Who writes what
//
// The controller creates the Lease (holder spec.primary, epoch 1) and moves
// it (new holder, epoch+1) with a conditional update on the resourceVersion
// it read, so two controllers, or a restarted one, cannot both move it. Every
// read is checked with CheckOwner: a Lease whose uid annotation names another
// pair, or none, is refused, and the controller takes no step on it.
//
// The writer's agent renews the Lease about every second with one JSON patch
// (RenewPatch) whose test operations make the API server apply it only while
// the Lease still belongs to the agent's pair (uid), names this node, and is
// at the epoch the agent writes at. No read, no conflict with the
// controller's move: a move makes the next renewal fail.
//
// # Time: no two clocks are ever compared
//
// The agent keeps writing until FenceMargin(d) before d (the Lease's
// duration) has passed on its own monotonic clock since the START of its last
// successful renewal (GrantUntil). The controller counts a Lease expired when
// d + ExpiryMargin has passed on its own monotonic clock since it last SAW
// the Lease change (Observer), as client-go's leader election does with its
// observedTime. Since a renewal is seen only after it was sent, the
// controller's count starts later than the agent's and lasts longer: the
// writer has fenced itself before the controller moves the authority,
// whatever the two nodes' wall clocks say. A Lease the controller sees for
// the first time (after a restart, a leader change) counts from that sight.
//
// The one assumption is about clock rates: over one lease period, the
// agent's and the controller's monotonic clocks may run at rates differing
// by less than FenceMargin's share of the duration (d/20, so 5% in total,
// 2.5% each way; NTP keeps real clocks within 0.05%). Wall-clock agreement
// is not assumed. A node whose monotonic clock stops while the system is
// suspended to RAM breaks the rate assumption: agents must not run on nodes
// that suspend.
//
// A renewal the controller never sees (its update conflicts) is still safe:
// the controller moves the authority only with an update conditional on the
// resourceVersion it saw, so a renewal after that sight makes the move fail.
package authority

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// Annotations on an authority Lease.
const (
	// AnnEpoch is the epoch of the current writer.
	AnnEpoch = "storage.tandem.dev/epoch"
	// AnnFailedOver is "true" while the writer is the backup because of a
	// failover (cleared by failback).
	AnnFailedOver = "storage.tandem.dev/failed-over"
	// AnnVolumePair is the owning pair's "<namespace>/<name>", for people
	// and for recognising a Lease of the older naming (Adopt).
	AnnVolumePair = "storage.tandem.dev/volumepair"
	// AnnVolumePairUID is the owning pair's UID; ownership is checked on it.
	AnnVolumePairUID = "storage.tandem.dev/volumepair-uid"
)

// Timing.
const (
	// DefaultLeaseDuration is spec.failover.leaseDurationSeconds' default
	// (the CRD's +kubebuilder:default, checked by a test), assumed for a
	// Lease that carries no duration or has not been read yet.
	DefaultLeaseDuration = 6 * time.Second
	// ExpiryMargin is added to a Lease's duration before the controller
	// counts it expired (Observer).
	ExpiryMargin = 500 * time.Millisecond
)

// namePrefix starts every authority Lease's name.
const namePrefix = "tandem-pair-"

// legacyPrefix and the join below are the naming before pair UIDs
// (the removed v1alpha1 name function): "tandem-pair-<namespace>-<name>".
const legacyPrefix = namePrefix

// FenceMargin is how long before a lease duration d has passed since the
// start of its last renewal an agent stops accepting writes: d/20, at least
// 100 ms. Together with ExpiryMargin it absorbs a difference in clock rate
// between the agent and the controller (package doc).
func FenceMargin(d time.Duration) time.Duration {
	return max(100*time.Millisecond, d/20)
}

// GrantUntil is when a renewal that started at start (on the agent's
// monotonic clock) of a Lease lasting d stops authorising writes.
func GrantUntil(start time.Time, d time.Duration) time.Time {
	return start.Add(d - FenceMargin(d))
}

// Pair identifies a VolumePair.
type Pair struct {
	Namespace, Name string
	UID             types.UID
}

// PairOf is vp's identity.
func PairOf(vp *v1.VolumePair) Pair {
	return Pair{Namespace: vp.Namespace, Name: vp.Name, UID: vp.UID}
}

func (p Pair) String() string {
	n := p.Namespace + "/" + p.Name
	if p.Namespace == "" && p.Name == "" {
		n = "(unnamed)"
	}
	if p.UID == "" {
		return n + " (no uid)"
	}
	return n + " (uid " + string(p.UID) + ")"
}

// uidRE is what a UID may look like to name a Lease: lowercase letters,
// digits and dashes (the API server's UUIDs), so the name is a valid object
// name and the agent's input cannot reach anything else.
var uidRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,48}[a-z0-9])?$`)

// LeaseName is the name of the authority Lease of the pair with this UID.
func LeaseName(uid types.UID) (string, error) {
	if !uidRE.MatchString(string(uid)) {
		return "", fmt.Errorf("VolumePair UID %q cannot name an authority Lease (want 1-50 lowercase letters, digits and dashes)", uid)
	}
	return namePrefix + string(uid), nil
}

// LegacyLeaseName is the name authority Leases had before they were named
// after the pair's UID. Different pairs can share it ("team-a/db" and
// "team/a-db"); it is only used to adopt such a Lease (Adopt).
func LegacyLeaseName(namespace, name string) string {
	s := namespace + "-" + name
	n := legacyPrefix + s
	if len(n) <= 63 {
		return n
	}
	sum := sha256Hex(s)
	return n[:63-11] + "-" + sum[:10]
}

// NewLease is the authority Lease of p, created by the controller in
// namespace with holder as the writer at epoch.
func NewLease(namespace string, p Pair, holder string, epoch uint64, d time.Duration, now time.Time) (*coordinationv1.Lease, error) {
	name, err := LeaseName(p.UID)
	if err != nil {
		return nil, err
	}
	t := metav1.NewMicroTime(now)
	return &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: namespace, Name: name,
			Labels: map[string]string{v1.LabelComponent: "authority"},
			Annotations: map[string]string{
				AnnEpoch:         strconv.FormatUint(epoch, 10),
				AnnVolumePair:    p.Namespace + "/" + p.Name,
				AnnVolumePairUID: string(p.UID),
			},
		},
		Spec: coordinationv1.LeaseSpec{
			HolderIdentity: ptr.To(holder), LeaseDurationSeconds: ptr.To(seconds(d)),
			AcquireTime: &t, RenewTime: &t, LeaseTransitions: ptr.To(int32(0)),
		},
	}, nil
}

// Move hands l to holder at epoch (the controller's failover or switch):
// duration d from now, failedOver recorded.
func Move(l *coordinationv1.Lease, holder string, epoch uint64, failedOver bool, d time.Duration, now time.Time) {
	t := metav1.NewMicroTime(now)
	l.Spec.HolderIdentity = ptr.To(holder)
	l.Spec.AcquireTime, l.Spec.RenewTime = &t, &t
	l.Spec.LeaseDurationSeconds = ptr.To(seconds(d))
	l.Spec.LeaseTransitions = ptr.To(ptr.Deref(l.Spec.LeaseTransitions, 0) + 1)
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	l.Annotations[AnnEpoch] = strconv.FormatUint(epoch, 10)
	if failedOver {
		l.Annotations[AnnFailedOver] = "true"
	} else {
		delete(l.Annotations, AnnFailedOver)
	}
}

func seconds(d time.Duration) int32 {
	if d <= 0 {
		d = DefaultLeaseDuration
	}
	return int32((d + time.Second - 1) / time.Second)
}

// NotOwnedError is a Lease that belongs to another pair than the one that
// read it (or to none it can name).
type NotOwnedError struct {
	Lease string // namespace/name
	Want  Pair   // the pair that read it
	Owner Pair   // what its annotations say
}

func (e *NotOwnedError) Error() string {
	if e.Owner.UID == "" {
		return fmt.Sprintf("authority Lease %s carries no %s annotation (it names %s): it is not the Lease of %s; refusing to act on it",
			e.Lease, AnnVolumePairUID, e.Owner, e.Want)
	}
	return fmt.Sprintf("authority Lease %s belongs to VolumePair %s, not to %s; refusing to act on it", e.Lease, e.Owner, e.Want)
}

// Owner is the pair l's annotations name.
func Owner(l *coordinationv1.Lease) Pair {
	ns, name, _ := strings.Cut(l.Annotations[AnnVolumePair], "/")
	return Pair{Namespace: ns, Name: name, UID: types.UID(l.Annotations[AnnVolumePairUID])}
}

// CheckOwner returns nil if l is p's authority Lease: its uid annotation is
// p's UID. Otherwise a *NotOwnedError naming both pairs.
func CheckOwner(l *coordinationv1.Lease, p Pair) error {
	owner := Owner(l)
	if p.UID != "" && owner.UID == p.UID {
		return nil
	}
	return &NotOwnedError{Lease: l.Namespace + "/" + l.Name, Want: p, Owner: owner}
}

// IsNotOwned reports whether err is (or wraps) a *NotOwnedError.
func IsNotOwned(err error) bool {
	var e *NotOwnedError
	return errors.As(err, &e)
}

// Holder decodes the writer and its epoch.
func Holder(l *coordinationv1.Lease) (string, uint64, error) {
	holder := ptr.Deref(l.Spec.HolderIdentity, "")
	s, ok := l.Annotations[AnnEpoch]
	if !ok {
		return holder, 0, fmt.Errorf("authority Lease %s has no %s annotation", l.Name, AnnEpoch)
	}
	epoch, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return holder, 0, fmt.Errorf("authority Lease %s: bad %s annotation %q: %w", l.Name, AnnEpoch, s, err)
	}
	if holder == "" {
		return "", epoch, fmt.Errorf("authority Lease %s names no holder", l.Name)
	}
	return holder, epoch, nil
}

// FailedOver reports whether l's writer is the backup because of a failover.
func FailedOver(l *coordinationv1.Lease) bool { return l.Annotations[AnnFailedOver] == "true" }

// Duration is l's lease duration (DefaultLeaseDuration if unset).
func Duration(l *coordinationv1.Lease) time.Duration {
	s := ptr.Deref(l.Spec.LeaseDurationSeconds, 0)
	if s <= 0 {
		return DefaultLeaseDuration
	}
	return time.Duration(s) * time.Second
}

// annPath is the JSON pointer (RFC 6901) of an annotation.
func annPath(key string) string {
	return "/metadata/annotations/" + strings.ReplaceAll(strings.ReplaceAll(key, "~", "~0"), "/", "~1")
}

// RenewPatch is the agent's renewal of the Lease of the pair uid, as node
// writing at epoch, started at start: a JSON patch (RFC 6902) whose test
// operations the API server checks on the current object in the same update,
// so it applies only while the Lease belongs to that pair, names node and
// is at epoch. An agent can therefore never renew another pair's Lease, nor
// one the controller moved. renewTime is written for people; nobody
// computes with it.
func RenewPatch(uid types.UID, node string, epoch uint64, start time.Time) ([]byte, error) {
	if uid == "" {
		return nil, errors.New("renewal patch: no pair UID")
	}
	type op struct {
		Op    string `json:"op"`
		Path  string `json:"path"`
		Value any    `json:"value"`
	}
	b, err := json.Marshal([]op{
		{Op: "test", Path: annPath(AnnVolumePairUID), Value: string(uid)},
		{Op: "test", Path: "/spec/holderIdentity", Value: node},
		{Op: "test", Path: annPath(AnnEpoch), Value: strconv.FormatUint(epoch, 10)},
		{Op: "add", Path: "/spec/renewTime", Value: metav1.NewMicroTime(start)},
	})
	if err != nil {
		return nil, fmt.Errorf("encode the renewal patch: %w", err)
	}
	return b, nil
}

// Adoptable reports whether old, found under p's LegacyLeaseName, is p's
// Lease of the older naming: it names p (namespace/name) and no UID. A
// Lease of that name naming another pair ("team/a-db" for "team-a/db"), or
// carrying a UID, is not p's and must be left alone.
func Adoptable(old *coordinationv1.Lease, p Pair) bool {
	_, hasUID := old.Annotations[AnnVolumePairUID]
	return !hasUID && old.Annotations[AnnVolumePair] == p.Namespace+"/"+p.Name
}

// Adopt is the Lease that replaces old (Adoptable for p) under p's new
// name: same holder, epoch, failed-over mark, duration and transitions,
// renewed now (the controller's observation starts with its creation, so
// its expiry is counted from then).
func Adopt(old *coordinationv1.Lease, p Pair, now time.Time) (*coordinationv1.Lease, error) {
	holder, epoch, err := Holder(old)
	if err != nil {
		return nil, err
	}
	l, err := NewLease(old.Namespace, p, holder, epoch, Duration(old), now)
	if err != nil {
		return nil, err
	}
	if FailedOver(old) {
		l.Annotations[AnnFailedOver] = "true"
	}
	l.Spec.LeaseTransitions = ptr.To(ptr.Deref(old.Spec.LeaseTransitions, 0))
	return l, nil
}
