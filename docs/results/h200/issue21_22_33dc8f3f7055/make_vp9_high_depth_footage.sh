cd /work/main
for f in .footage/*; do b=$(basename ${f%.*})
 for pf in yuv420p10le yuv420p12le yuv444p10le; do
  ffmpeg -hide_banner -loglevel error -y -i $f -t 6 -an -c:v libvpx-vp9 -pix_fmt $pf -b:v 0 -crf 32 -deadline good -cpu-used 4 -row-mt 1 .vp9hi/${b}_vp9_${pf}.webm
 done; done; echo done
