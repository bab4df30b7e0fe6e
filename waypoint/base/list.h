/* An intrusive circular doubly linked list (the kernel's list_head, minimal). */
#ifndef WP_LIST_H
#define WP_LIST_H

#include <stdbool.h>

struct wp_list {
        struct wp_list *prev, *next;
};

static inline void wp_list_init(struct wp_list *l)
{
        l->prev = l->next = l;
}
static inline bool wp_list_empty(const struct wp_list *l)
{
        return l->next == l;
}
static inline void wp_list_add_tail(struct wp_list *head, struct wp_list *n)
{
        n->prev = head->prev;
        n->next = head;
        head->prev->next = n;
        head->prev = n;
}
/* Unlinks n and leaves it self-linked (so a second wp_list_del is harmless). */
static inline void wp_list_del(struct wp_list *n)
{
        n->prev->next = n->next;
        n->next->prev = n->prev;
        wp_list_init(n);
}

#endif
