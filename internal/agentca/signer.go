package agentca

import (
	"context"
	"fmt"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/clock"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
)

// Condition reasons the Signer sets.
const (
	ReasonApproved = "TandemAgentApproved"
	ReasonDenied   = "TandemAgentDenied"
	ReasonFailed   = "TandemAgentCheckFailed"
)

// Signer is the controller that approves, denies and signs the agents'
// CSRs (see the package documentation). It runs on the leader only.
type Signer struct {
	Client client.Client
	CA     *CA
	Policy Policy
	Clock  clock.PassiveClock // nil: the real clock
}

// +kubebuilder:rbac:groups=certificates.k8s.io,resources=certificatesigningrequests,verbs=get;list;watch
// +kubebuilder:rbac:groups=certificates.k8s.io,resources=certificatesigningrequests/approval;certificatesigningrequests/status,verbs=update
// +kubebuilder:rbac:groups=certificates.k8s.io,resources=signers,resourceNames=tandem.dev/agent,verbs=approve;sign

// SetupWithManager registers the Signer, watching CSRs of SignerName only.
func (s *Signer) SetupWithManager(mgr ctrl.Manager) error {
	if s.Clock == nil {
		s.Clock = clock.RealClock{}
	}
	return ctrl.NewControllerManagedBy(mgr).
		Named("agent-csr-signer").
		For(&certv1.CertificateSigningRequest{}, builder.WithPredicates(predicate.NewPredicateFuncs(func(o client.Object) bool {
			csr, ok := o.(*certv1.CertificateSigningRequest)
			return ok && csr.Spec.SignerName == SignerName
		}))).
		Complete(s)
}

// Reconcile decides one CSR.
func (s *Signer) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var csr certv1.CertificateSigningRequest
	if err := s.Client.Get(ctx, req.NamespacedName, &csr); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	return ctrl.Result{}, s.Decide(ctx, &csr)
}

// Decide approves and signs csr, or denies it, or marks it Failed (see the
// package documentation); CSRs of other signers, already signed, denied or
// failed are left alone.
func (s *Signer) Decide(ctx context.Context, csr *certv1.CertificateSigningRequest) error {
	if csr.Spec.SignerName != SignerName || len(csr.Status.Certificate) > 0 {
		return nil
	}
	approved := false
	for _, c := range csr.Status.Conditions {
		switch c.Type {
		case certv1.CertificateDenied, certv1.CertificateFailed:
			return nil
		case certv1.CertificateApproved:
			approved = true
		}
	}
	lg := log.FromContext(ctx).WithValues("csr", csr.Name, "requester", csr.Spec.Username)
	now := s.now()
	parsed, node, err := s.Policy.Check(csr)
	if err != nil {
		typ, reason, verb := certv1.CertificateDenied, ReasonDenied, "Denied"
		if approved {
			// Someone else approved it; it is still not signed.
			typ, reason, verb = certv1.CertificateFailed, ReasonFailed, "Refused to sign the approved"
		}
		lg.Info(verb+" agent CSR", "reason", err.Error())
		csr.Status.Conditions = append(csr.Status.Conditions, certv1.CertificateSigningRequestCondition{
			Type: typ, Status: corev1.ConditionTrue, Reason: reason, Message: err.Error(),
			LastUpdateTime: metav1.NewTime(now), LastTransitionTime: metav1.NewTime(now),
		})
		if approved {
			err = s.Client.Status().Update(ctx, csr)
		} else {
			err = s.Client.SubResource("approval").Update(ctx, csr)
		}
		if err != nil {
			return fmt.Errorf("CSR %s: set %s: %w", csr.Name, typ, err)
		}
		return nil
	}
	if !approved {
		csr.Status.Conditions = append(csr.Status.Conditions, certv1.CertificateSigningRequestCondition{
			Type: certv1.CertificateApproved, Status: corev1.ConditionTrue, Reason: ReasonApproved,
			Message:        fmt.Sprintf("the agent of node %s asked for its own identity with a Pod-bound ServiceAccount token of that node", node),
			LastUpdateTime: metav1.NewTime(now), LastTransitionTime: metav1.NewTime(now),
		})
		if err := s.Client.SubResource("approval").Update(ctx, csr); err != nil {
			return fmt.Errorf("CSR %s: approve: %w", csr.Name, err)
		}
	}
	lifetime := s.Policy.Lifetime(csr)
	addrs := NodeAddresses{DNSNames: []string{node}}
	var n corev1.Node
	switch err := s.Client.Get(ctx, client.ObjectKey{Name: node}, &n); {
	case err == nil:
		addrs = AddressesOf(&n)
	case apierrors.IsNotFound(err):
		lg.Info("Node not found: its certificate names no address", "node", node)
	default:
		return fmt.Errorf("CSR %s: read node %s for its addresses: %w", csr.Name, node, err)
	}
	certPEM, err := s.CA.SignCSR(parsed, node, addrs, csr.Spec.Usages, lifetime, now)
	if err != nil {
		return fmt.Errorf("CSR %s: %w", csr.Name, err)
	}
	csr.Status.Certificate = certPEM
	if err := s.Client.Status().Update(ctx, csr); err != nil {
		return fmt.Errorf("CSR %s: write the certificate: %w", csr.Name, err)
	}
	lg.Info("Signed agent CSR", "node", node, "lifetime", lifetime, "dnsNames", addrs.DNSNames, "ips", fmt.Sprint(addrs.IPs))
	return nil
}

func (s *Signer) now() time.Time {
	if s.Clock == nil {
		return time.Now()
	}
	return s.Clock.Now()
}
