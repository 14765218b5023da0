package v1alpha1

import (
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// TestAddToScheme: the scheme knows both kinds under the group-version, and
// the meta types a client needs to list and watch them (ListOptions...).
func TestAddToScheme(t *testing.T) {
	s := runtime.NewScheme()
	if err := AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"VolumePair", "VolumePairList", "ListOptions", "GetOptions", "DeleteOptions", "WatchEvent"} {
		if !s.Recognizes(GroupVersion.WithKind(kind)) {
			t.Errorf("scheme does not recognise %s", GroupVersion.WithKind(kind))
		}
	}
	gvks, _, err := s.ObjectKinds(&VolumePair{})
	if err != nil || len(gvks) != 1 || gvks[0] != GroupVersion.WithKind("VolumePair") {
		t.Errorf("ObjectKinds(VolumePair) = %v, %v", gvks, err)
	}
	var opts metav1.ListOptions
	if err := s.Convert(&metav1.ListOptions{Limit: 3}, &opts, nil); err != nil || opts.Limit != 3 {
		t.Errorf("ListOptions conversion: %v (limit %d)", err, opts.Limit)
	}
}
