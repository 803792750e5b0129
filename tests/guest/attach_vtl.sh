#!/bin/sh
# In the test guest: a virtual tape library (tgt's SSC tape drive and SMC changer with two
# cartridges: one in the drive, one in slot 33) attached to the guest's kernel over iSCSI on 127.0.0.1:3261, so the guest has
# a real SCSI tape (st/nst + sg) and medium changer (sch + sg) for the pass-through target.
set -e
VTL=/tmp/vtl
mkdir -p $VTL /run/tgtd /run/lock/iscsi /var/lib/iscsi
modprobe -q iscsi_tcp; modprobe -q ch
dd if=/dev/zero of=$VTL/smc bs=1k count=1 2>/dev/null
for tape in T0000001 T0000002; do
  tgtimg --op new --device-type tape --barcode $tape --size 64 --type data --file $VTL/$tape >/dev/null
done
tgtd --iscsi portal=127.0.0.1:3261 -f > /tmp/tgtd.log 2>&1 &
sleep 1
T=iqn.2024-01.org.example.guest:vtl
tgtadm --lld iscsi --op new --mode target --tid 1 -T $T
tgtadm --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 -b $VTL/T0000001 --device-type=tape
tgtadm --lld iscsi --mode logicalunit --op new --tid 1 --lun 2 -b $VTL/smc --device-type=changer
tgtadm --lld iscsi --mode logicalunit --op update --tid 1 --lun 2 --params media_home=$VTL
tgtadm --lld iscsi --mode logicalunit --op update --tid 1 --lun 2 --params element_type=4,start_address=1,quantity=1
tgtadm --lld iscsi --mode logicalunit --op update --tid 1 --lun 2 --params element_type=4,address=1,tid=1,lun=1
tgtadm --lld iscsi --mode logicalunit --op update --tid 1 --lun 2 --params element_type=1,start_address=16,quantity=1
tgtadm --lld iscsi --mode logicalunit --op update --tid 1 --lun 2 --params element_type=2,start_address=32,quantity=4
tgtadm --lld iscsi --mode logicalunit --op update --tid 1 --lun 2 --params element_type=2,address=33,barcode=T0000002,sides=1
tgtadm --lld iscsi --op bind --mode target --tid 1 -I ALL
iscsid
sleep 1
iscsiadm -m discovery -t st -p 127.0.0.1:3261 >/dev/null
iscsiadm -m node -T $T -p 127.0.0.1:3261 --login >/dev/null
for i in $(seq 100); do
  [ -e /sys/class/scsi_tape/st0 ] && [ -e /sys/class/scsi_changer/sch0 ] && break
  sleep 0.1
done
echo "VTL ATTACHED $(ls /sys/class/scsi_tape /sys/class/scsi_changer | tr '\n' ' ')"
