package csi

import (
	"encoding/binary"
	"strings"
	"testing"
)

func TestInMountinfo(t *testing.T) {
	const table = `22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
36 22 0:32 / /var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/pvc-1/mount rw - ext4 /dev/loop3 rw
37 22 0:33 / /mnt/with\040space rw - tmpfs tmpfs rw
`
	for path, want := range map[string]bool{
		"/": true, "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/pvc-1/mount": true,
		"/mnt/with space": true, "/mnt/with\\040space": false, "/var/lib/kubelet": false,
	} {
		got, err := inMountinfo(strings.NewReader(table), path)
		if err != nil || got != want {
			t.Errorf("%q: %t, %v; want %t", path, got, err, want)
		}
	}
}

func TestDetectFilesystem(t *testing.T) {
	ext := make([]byte, 4096)
	binary.LittleEndian.PutUint16(ext[1080:], 0xEF53)
	xfs := append([]byte("XFSB"), make([]byte, 4092)...)
	luks := append([]byte("LUKS\xba\xbe"), make([]byte, 4090)...)
	for _, tc := range []struct {
		name string
		b    []byte
		want string
		err  bool
	}{
		{"blank", make([]byte, 65536), "", false},
		{"ext4", ext, "ext4", false},
		{"xfs", xfs, "xfs", false},
		{"other data", luks, "", true},
		{"short blank", make([]byte, 10), "", false},
	} {
		got, err := detectFilesystem(tc.b)
		if got != tc.want || (err != nil) != tc.err {
			t.Errorf("%s: %q, %v", tc.name, got, err)
		}
	}
}

func TestMountFlags(t *testing.T) {
	flags, data := mountFlags([]string{"noatime", "ro", "discard", "data=ordered", "defaults"})
	if data != "discard,data=ordered" || flags == 0 {
		t.Fatalf("flags %x data %q", flags, data)
	}
}
