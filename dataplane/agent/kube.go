package agent

// Registration and authority through the Kubernetes API server.
//
// The agent renews a Lease "tandem-agent-<node>" in the operator namespace as
// its heartbeat; the Lease's annotations carry its control, replication and
// NBD endpoints and its data directory, so the controller finds agents
// without kubelet-managed Pods and can say where a replica it could not
// remove was left.
//
// For every volume it serves as primary, the agent renews the pair's
// authority Lease (named after the VolumePair's UID, which the controller
// sends with every role as volume.Spec.PairUID; package internal/authority
// owns the protocol) while it names this node as holder at the volume's
// epoch. A volume without a PairUID is never authorised. Writes are accepted
// only until the start of the last successful renewal plus the lease
// duration less a margin (authority.GrantUntil), on the agent's monotonic
// clock: an agent cut off from the API server fences itself before the
// controller, which counts the expiry on its own clock from when it saw the
// renewal, promotes the backup. The two clocks are never compared.
//
// Renewal cost: one request per primary volume and second, a JSON patch of
// renewTime whose test operations make it apply only while the Lease still
// belongs to the volume's pair and names this node at the volume's epoch
// (authority.RenewPatch): no read first, no conflict with the controller,
// which moves the authority with a conditional update. Only a refused patch
// costs a Get, which shows the new holder and fences the volume. The volumes
// are renewed concurrently (at most renewParallel at a time, one renewal per
// volume in flight), so a node serving many primaries renews each of them
// about every second, not one after another. A renewal may take up to the
// Lease duration less a second (renewTimeout): a slow API server delays the
// grant but does not fence the writer while answers come within that.

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	coordclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/authority"
)

// Agent heartbeat timing.
const (
	AgentLeaseDuration = 10 * time.Second
	agentRenewEvery    = 2 * time.Second
	authorityRenew     = time.Second
	apiTimeout         = 2 * time.Second
	renewParallel      = 8
)

// Endpoints are what the agent advertises on its Lease.
type Endpoints struct {
	Control, Replication, NBD string
	// DataDir is the agent's data directory (absolute), advertised so the
	// controller can name a replica's files it could not remove.
	DataDir string
}

// Option configures Register and NewKubeAuthority.
type Option func(*options)

type options struct {
	clock clock.PassiveClock
}

// WithClock sets the clock (default clock.RealClock{}): the agent Lease's
// renewTime and the authority's renewal times and self-fencing deadlines
// come from it. Tests give an agent a clock skewed against the
// controller's.
func WithClock(c clock.PassiveClock) Option { return func(o *options) { o.clock = c } }

func newOptions(opts []Option) options {
	o := options{clock: clock.RealClock{}}
	for _, f := range opts {
		f(&o)
	}
	return o
}

// Register creates and renews the agent's Lease until ctx is done.
func Register(ctx context.Context, leases coordclient.LeasesGetter, namespace, node string, ep Endpoints, log logLike, opts ...Option) {
	o := newOptions(opts)
	name := v1.AgentLeaseName(node)
	t := time.NewTicker(agentRenewEvery)
	defer t.Stop()
	failing := false
	for {
		err := renewAgentLease(ctx, leases.Leases(namespace), name, node, ep, o.clock)
		switch {
		case err != nil && !failing:
			log.Error(err, "Cannot renew the agent Lease", "lease", name)
			failing = true
		case err == nil && failing:
			log.Info("Agent Lease renewed again", "lease", name)
			failing = false
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

type logLike interface {
	Info(msg string, kv ...any)
	Error(err error, msg string, kv ...any)
}

func renewAgentLease(ctx context.Context, c coordclient.LeaseInterface, name, node string, ep Endpoints, clk clock.PassiveClock) error {
	// Half the Lease: a slow API server delays the heartbeat, a renewal
	// that lands within that still keeps the Lease current.
	ctx, cancel := context.WithTimeout(ctx, AgentLeaseDuration/2)
	defer cancel()
	now := metav1.NewMicroTime(clk.Now())
	ann := map[string]string{
		v1.AnnControlEndpoint:     ep.Control,
		v1.AnnReplicationEndpoint: ep.Replication,
		v1.AnnNBDEndpoint:         ep.NBD,
	}
	if ep.DataDir != "" {
		ann[v1.AnnDataDir] = ep.DataDir
		var st unix.Statfs_t
		if err := unix.Statfs(ep.DataDir, &st); err == nil {
			ann[v1.AnnFreeBytes] = strconv.FormatUint(st.Bavail*uint64(st.Bsize), 10)
			ann[v1.AnnCapacityBytes] = strconv.FormatUint(st.Blocks*uint64(st.Bsize), 10)
		}
	}
	l, err := c.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		l = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann,
				Labels: map[string]string{v1.LabelComponent: "agent", v1.LabelNode: node}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(node), LeaseDurationSeconds: ptr.To(int32(AgentLeaseDuration / time.Second)),
				AcquireTime: &now, RenewTime: &now},
		}
		_, err = c.Create(ctx, l, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create agent Lease %s: %w", name, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("get agent Lease %s: %w", name, err)
	}
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	for k, v := range ann {
		l.Annotations[k] = v
	}
	l.Spec.HolderIdentity = ptr.To(node)
	l.Spec.LeaseDurationSeconds = ptr.To(int32(AgentLeaseDuration / time.Second))
	l.Spec.RenewTime = &now
	if _, err := c.Update(ctx, l, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("renew agent Lease %s: %w", name, err)
	}
	return nil
}

// KubeAuthority is a volume.Authority backed by the per-pair Leases.
type KubeAuthority struct {
	leases    coordclient.LeaseInterface
	node      string
	namespace string
	clock     clock.PassiveClock

	mu        sync.Mutex
	grants    map[string]grant
	durations map[string]time.Duration // each volume's Lease duration, once renewed
	kick      chan struct{}
}

type grant struct {
	pairUID string
	epoch   uint64
	renewed time.Time // start of the last successful renewal (agent clock)
	until   time.Time // authority.GrantUntil of it
	reason  string
	// refused is the epoch of the last refused renewal: a volume at a
	// higher epoch than both it and epoch has not had an answer yet.
	refused uint64
}

// Primary is what renewing a primary volume's authority needs.
type Primary struct {
	// Epoch is the epoch the volume writes at.
	Epoch uint64
	// PairUID is the VolumePair's UID, which names its authority Lease.
	PairUID string
}

// NewKubeAuthority returns an authority for node's volumes.
func NewKubeAuthority(leases coordclient.LeasesGetter, namespace, node string, opts ...Option) *KubeAuthority {
	o := newOptions(opts)
	return &KubeAuthority{leases: leases.Leases(namespace), node: node, namespace: namespace, clock: o.clock,
		grants: map[string]grant{}, durations: map[string]time.Duration{}, kick: make(chan struct{}, 1)}
}

// Authorized implements volume.Authority.
func (k *KubeAuthority) Authorized(vol string, epoch uint64) error {
	now := k.clock.Now()
	k.mu.Lock()
	g, ok := k.grants[vol]
	k.mu.Unlock()
	switch {
	case !ok || (g.epoch < epoch && g.refused < epoch):
		// Just made the writer at this epoch: no renewal has answered
		// yet. Requests wait for it (volume.ErrAuthorityPending).
		k.Kick()
		return fmt.Errorf("authority Lease not yet renewed by this node at epoch %d: %w", epoch, volume.ErrAuthorityPending)
	case g.reason != "" && now.After(g.until):
		return fmt.Errorf("no authority: %s", g.reason)
	case g.epoch != epoch:
		return fmt.Errorf("authority Lease is at epoch %d, not %d", g.epoch, epoch)
	case now.After(g.until):
		return fmt.Errorf("authority Lease not renewed since %s (self-fenced)", g.renewed.Format(time.RFC3339))
	}
	return nil
}

// Kick asks the renewal loop to run now (a volume just became primary).
func (k *KubeAuthority) Kick() {
	select {
	case k.kick <- struct{}{}:
	default:
	}
}

// Run renews the authority Lease of every volume primaries() returns until
// ctx is done. Every round (a second, or a Kick) starts a renewal of each
// primary volume that has none in flight, so one slow renewal does not hold
// back the others' next round; a renewal that took longer than a round is
// followed at once by the next one for that volume.
func (k *KubeAuthority) Run(ctx context.Context, primaries func() map[string]Primary, log logLike) {
	t := time.NewTicker(authorityRenew)
	defer t.Stop()
	sem := make(chan struct{}, renewParallel)
	var wg sync.WaitGroup
	defer wg.Wait()
	var mu sync.Mutex
	inflight := map[string]bool{}
	for {
		prim := primaries()
		k.forget(prim)
		for vol, p := range prim {
			mu.Lock()
			busy := inflight[vol]
			inflight[vol] = true
			mu.Unlock()
			if busy {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() {
					mu.Lock()
					delete(inflight, vol)
					mu.Unlock()
				}()
				select {
				case sem <- struct{}{}:
				case <-ctx.Done():
					return
				}
				defer func() { <-sem }()
				for ctx.Err() == nil {
					start := k.clock.Now()
					if err := k.renew(ctx, vol, p); err != nil {
						log.Info("Authority not renewed", "volume", vol, "epoch", p.Epoch, "reason", err.Error())
					}
					if k.clock.Since(start) < authorityRenew {
						return
					}
					// A slow renewal: the next round may be most of a
					// second away, renew again now while it is still a
					// primary.
					var ok bool
					if p, ok = primaries()[vol]; !ok {
						return
					}
				}
			}()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-k.kick:
		}
	}
}

// renewTimeout bounds one renewal of a Lease lasting dur: the Lease
// duration less a round, at least apiTimeout. A late answer is still worth
// having, since the grant it brings runs from the renewal's start. With the
// default 6 s Lease and renewals back to back, an API server answering in
// up to about 3 s keeps the writer's authority, where a fixed 2 s timeout
// let every renewal fail and fenced it.
func renewTimeout(dur time.Duration) time.Duration {
	return max(apiTimeout, dur-authorityRenew)
}

// refuse records that vol may not write, for reason, from now on.
func (k *KubeAuthority) refuse(vol string, p Primary, reason string) error {
	k.mu.Lock()
	k.grants[vol] = grant{pairUID: p.PairUID, epoch: p.Epoch, reason: reason}
	k.mu.Unlock()
	return fmt.Errorf("%s", reason)
}

func (k *KubeAuthority) renew(ctx context.Context, vol string, p Primary) error {
	// The renewal's start, on this agent's clock: the grant runs from here,
	// before the request leaves, so it ends before the controller (which
	// counts from when it sees the renewal) may consider the Lease expired.
	start := k.clock.Now()
	uid := types.UID(p.PairUID)
	if uid == "" {
		return k.refuse(vol, p, "no VolumePair UID for this volume (configured by an older controller?): its authority Lease cannot be named")
	}
	lname, err := authority.LeaseName(uid)
	if err != nil {
		return k.refuse(vol, p, err.Error())
	}
	pair := authority.Pair{UID: uid}
	k.mu.Lock()
	if g, ok := k.grants[vol]; ok && g.pairUID != p.PairUID {
		// Another VolumePair of the same name: nothing of the old one's
		// authority carries over.
		delete(k.grants, vol)
		delete(k.durations, vol)
	}
	dur, known := k.durations[vol]
	k.mu.Unlock()
	if !known {
		dur = authority.DefaultLeaseDuration // not renewed yet: the VolumePair default
	}
	ctx, cancel := context.WithTimeout(ctx, renewTimeout(dur))
	defer cancel()
	patch, err := authority.RenewPatch(uid, k.node, p.Epoch, start)
	if err != nil {
		return err
	}
	l, err := k.leases.Patch(ctx, lname, types.JSONPatchType, patch, metav1.PatchOptions{})
	if err == nil {
		holder, lepoch, herr := authority.Holder(l)
		if oerr := authority.CheckOwner(l, pair); herr != nil || oerr != nil || holder != k.node || lepoch != p.Epoch {
			// Cannot happen (the patch tests all of it); never grant on it.
			return fmt.Errorf("renewed authority Lease %s names %q at epoch %d (%v, %v)", lname, holder, lepoch, herr, oerr)
		}
		dur = authority.Duration(l)
		k.mu.Lock()
		k.grants[vol] = grant{pairUID: p.PairUID, epoch: p.Epoch, renewed: start, until: authority.GrantUntil(start, dur)}
		k.durations[vol] = dur
		k.mu.Unlock()
		return nil
	}
	if ctx.Err() != nil {
		return fmt.Errorf("renew authority Lease %s: %w", lname, err)
	}
	// Refused (most likely a test failed: the controller moved the
	// authority) or not sent: read the Lease to know, and fence the volume
	// if it is not this pair's or names someone else.
	cur, gerr := k.leases.Get(ctx, lname, metav1.GetOptions{})
	if gerr != nil {
		return fmt.Errorf("renew authority Lease %s: %w (and reading it: %w)", lname, err, gerr)
	}
	var reason string
	if oerr := authority.CheckOwner(cur, pair); oerr != nil {
		reason = oerr.Error()
	} else {
		holder, lepoch, herr := authority.Holder(cur)
		switch {
		case herr != nil:
			reason = herr.Error()
		case holder == k.node && lepoch == p.Epoch:
			return fmt.Errorf("renew authority Lease %s: %w", lname, err)
		default:
			reason = fmt.Sprintf("authority Lease %s names %q at epoch %d", lname, holder, lepoch)
		}
	}
	k.mu.Lock()
	g := k.grants[vol]
	g.reason, g.refused = reason, max(g.refused, p.Epoch)
	if g.epoch != p.Epoch || g.pairUID != p.PairUID {
		g.until = time.Time{}
	}
	k.grants[vol] = g
	k.mu.Unlock()
	return fmt.Errorf("%s", reason)
}

// forget drops what is kept of volumes that are no longer primaries.
func (k *KubeAuthority) forget(primaries map[string]Primary) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for vol := range k.durations {
		if _, ok := primaries[vol]; !ok {
			delete(k.durations, vol)
		}
	}
}

// Primaries returns the volumes this agent serves as primary, with what
// renewing their authority needs: those whose authority Lease it renews. A
// primary with a fault (its write-intent journal failed) is left out until
// the fault clears: if it lasts, its Lease expires and the controller fails
// over.
func (a *Agent) Primaries() map[string]Primary {
	out := map[string]Primary{}
	for _, v := range a.list() {
		if s := v.Spec(); s.Role == volume.RolePrimary && v.Fault() == nil {
			out[v.Name()] = Primary{Epoch: s.Epoch, PairUID: s.PairUID}
		}
	}
	return out
}
