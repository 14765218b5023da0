package agent

// Registration and authority through the Kubernetes API server.
//
// The agent renews a Lease "tandem-agent-<node>" in the operator namespace as
// its heartbeat; the Lease's annotations carry its control, replication and
// NBD endpoints, so the controller finds agents without kubelet-managed Pods.
//
// For every volume it serves as primary, the agent renews the per-pair
// authority Lease (v1alpha1.AuthorityLeaseName) while it names this node as
// holder at the volume's epoch. Writes are accepted only until the last
// successful renewal plus the lease duration (KubeAuthority.Authorized): an
// agent cut off from the API server fences itself before the controller
// promotes the backup, which it does only after the Lease has expired.
//
// Renewal cost: one conditional Update per primary volume and second (the
// Lease last read or written is kept, so no Get is needed while nobody else
// touches it; a conflict — the controller moved the authority — costs one
// Get, which then shows the new holder and fences the volume). The volumes
// are renewed concurrently (at most renewParallel at a time), so a node
// serving many primaries renews each of them about every second, not one
// after another.

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	coordclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/utils/ptr"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/dataplane/volume"
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
}

// Register creates and renews the agent's Lease until ctx is done.
func Register(ctx context.Context, leases coordclient.LeasesGetter, namespace, node string, ep Endpoints, log logLike) {
	name := v1.AgentLeaseName(node)
	t := time.NewTicker(agentRenewEvery)
	defer t.Stop()
	failing := false
	for {
		err := renewAgentLease(ctx, leases.Leases(namespace), name, node, ep)
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

func renewAgentLease(ctx context.Context, c coordclient.LeaseInterface, name, node string, ep Endpoints) error {
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	now := metav1.NewMicroTime(time.Now())
	ann := map[string]string{
		v1.AnnControlEndpoint:     ep.Control,
		v1.AnnReplicationEndpoint: ep.Replication,
		v1.AnnNBDEndpoint:         ep.NBD,
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

	mu     sync.Mutex
	grants map[string]grant
	seen   map[string]*coordinationv1.Lease // last seen authority Lease per volume
	kick   chan struct{}
}

type grant struct {
	epoch  uint64
	until  time.Time
	reason string
}

// NewKubeAuthority returns an authority for node's volumes.
func NewKubeAuthority(leases coordclient.LeasesGetter, namespace, node string) *KubeAuthority {
	return &KubeAuthority{leases: leases.Leases(namespace), node: node, namespace: namespace,
		grants: map[string]grant{}, seen: map[string]*coordinationv1.Lease{}, kick: make(chan struct{}, 1)}
}

// Authorized implements volume.Authority.
func (k *KubeAuthority) Authorized(vol string, epoch uint64) error {
	k.mu.Lock()
	g, ok := k.grants[vol]
	k.mu.Unlock()
	switch {
	case !ok:
		k.Kick()
		return fmt.Errorf("authority Lease not yet renewed by this node")
	case g.reason != "" && time.Now().After(g.until):
		return fmt.Errorf("no authority: %s", g.reason)
	case g.epoch != epoch:
		return fmt.Errorf("authority Lease is at epoch %d, not %d", g.epoch, epoch)
	case time.Now().After(g.until):
		return fmt.Errorf("authority Lease not renewed since %s (self-fenced)", g.until.Add(-time.Second).Format(time.RFC3339))
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
// ctx is done.
func (k *KubeAuthority) Run(ctx context.Context, primaries func() map[string]uint64, log logLike) {
	t := time.NewTicker(authorityRenew)
	defer t.Stop()
	sem := make(chan struct{}, renewParallel)
	for {
		prim := primaries()
		var wg sync.WaitGroup
		for vol, epoch := range prim {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				if err := k.renew(ctx, vol, epoch); err != nil {
					log.Info("Authority not renewed", "volume", vol, "epoch", epoch, "reason", err.Error())
				}
			}()
		}
		wg.Wait()
		k.forget(prim)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-k.kick:
		}
	}
}

func (k *KubeAuthority) renew(ctx context.Context, vol string, epoch uint64) error {
	ns, name, ok := cutName(vol)
	if !ok {
		return fmt.Errorf("bad volume name %q", vol)
	}
	lname := v1.AuthorityLeaseName(ns, name)
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	start := time.Now()
	k.mu.Lock()
	cached := k.seen[vol]
	k.mu.Unlock()
	if cached != nil && ptr.Deref(cached.Spec.HolderIdentity, "") == k.node && cached.Annotations[v1.AnnEpoch] == strconv.FormatUint(epoch, 10) {
		// Fast path: a conditional update of the Lease as last seen. Any
		// change by someone else (the controller moving the authority)
		// makes it conflict, and the slow path reads the new state.
		if ok, err := k.update(ctx, vol, epoch, cached.DeepCopy(), start); ok || !apierrors.IsConflict(err) {
			return err
		}
	}
	l, err := k.leases.Get(ctx, lname, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get authority Lease %s/%s: %w", k.namespace, lname, err)
	}
	_, err = k.update(ctx, vol, epoch, l, start)
	return err
}

// update renews l if it names this node at epoch, recording the grant; it
// reports whether the Lease was renewed. A Lease naming someone else fences
// the volume. start is when the renewal began: the grant runs from there.
func (k *KubeAuthority) update(ctx context.Context, vol string, epoch uint64, l *coordinationv1.Lease, start time.Time) (bool, error) {
	lname := l.Name
	holder := ptr.Deref(l.Spec.HolderIdentity, "")
	lepoch, _ := strconv.ParseUint(l.Annotations[v1.AnnEpoch], 10, 64)
	if holder != k.node || lepoch != epoch {
		reason := fmt.Sprintf("authority Lease %s names %q at epoch %d", lname, holder, lepoch)
		k.mu.Lock()
		g := k.grants[vol]
		g.reason = reason
		if g.epoch != epoch {
			g.until = time.Time{}
		}
		k.grants[vol] = g
		delete(k.seen, vol)
		k.mu.Unlock()
		return false, fmt.Errorf("%s", reason)
	}
	dur := time.Duration(ptr.Deref(l.Spec.LeaseDurationSeconds, 6)) * time.Second
	now := metav1.NewMicroTime(start)
	l.Spec.RenewTime = &now
	updated, err := k.leases.Update(ctx, l, metav1.UpdateOptions{})
	if err != nil {
		k.mu.Lock()
		delete(k.seen, vol)
		k.mu.Unlock()
		return false, fmt.Errorf("renew authority Lease %s: %w", lname, err)
	}
	k.mu.Lock()
	k.grants[vol] = grant{epoch: epoch, until: start.Add(dur)}
	k.seen[vol] = updated
	k.mu.Unlock()
	return true, nil
}

// forget drops the cached Leases of volumes that are no longer primaries.
func (k *KubeAuthority) forget(primaries map[string]uint64) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for vol := range k.seen {
		if _, ok := primaries[vol]; !ok {
			delete(k.seen, vol)
		}
	}
}

func cutName(vol string) (string, string, bool) {
	for i := 0; i < len(vol); i++ {
		if vol[i] == '/' {
			return vol[:i], vol[i+1:], i > 0 && i < len(vol)-1
		}
	}
	return "", "", false
}

// Primaries returns the volumes this agent serves as primary, with epochs.
func (a *Agent) Primaries() map[string]uint64 {
	out := map[string]uint64{}
	for _, v := range a.list() {
		if s := v.Spec(); s.Role == volume.RolePrimary {
			out[v.Name()] = s.Epoch
		}
	}
	return out
}
