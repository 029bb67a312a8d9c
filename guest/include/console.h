// SPDX-License-Identifier: MIT
/*
 * Shared by wisp's guest inits (nolibc): finding the console's tty, and making
 * it a process's controlling terminal.
 */
#ifndef WISP_CONSOLE_H
#define WISP_CONSOLE_H

/*
 * The device behind /dev/console: the last name in
 * /sys/class/tty/console/active (e.g. "ttyS0") under `dev` (e.g. "/dev/"), so a
 * shell or process gets a real tty that can be its controlling terminal:
 * /dev/console itself never becomes one on open. Falls back to /dev/console.
 */
static void console_path(char *buf, int size, const char *dev)
{
	char tmp[64];
	int fd, n, i, start = 0, dl = strlen(dev);

	strcpy(buf, "/dev/console");
	fd = open("/sys/class/tty/console/active", O_RDONLY, 0);
	if (fd < 0)
		return;
	n = read(fd, tmp, sizeof(tmp) - 1);
	close(fd);
	while (n > 0 && (tmp[n - 1] == '\n' || tmp[n - 1] == ' '))
		n--;
	if (n <= 0)
		return;
	tmp[n] = 0;
	for (i = 0; i < n; i++)
		if (tmp[i] == ' ')
			start = i + 1;
	if (start >= n || n - start + dl >= size)
		return;
	strcpy(buf, dev);
	strcpy(buf + dl, tmp + start);
}

/*
 * In a new child: a session of its own with `tty` as its controlling terminal
 * (so Ctrl-C reaches it) and as its stdin, stdout and stderr.
 */
static void take_console(const char *tty)
{
	int fd;

	setsid();
	fd = open(tty, O_RDWR, 0);
	if (fd >= 0) {
		ioctl(fd, TIOCSCTTY, (void *)1);
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
}

#endif
